"""How the benchmark measures: the models and archives it builds, the rows it times (in process and
served), and the interleaved rounds. What to run is cases.py; printing is report.py."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch
import yaml

from image_embedder.encoder import ImageEncoder
from image_embedder.image_decoding import ImageDecoder, default_decode_threads
from image_embedder.npy_codec import read_npy
from image_embedder.request_decoding import check_request_limits, decode_request
from image_embedder.response_encoding import encode_response
from image_embedder.settings import EncoderSettings
from image_embedder_bench import bench_models
from image_embedder_bench.bench_client import RunResult, run_clients
from image_embedder_bench.cases import (ARCHIVES, DECODE_PAYLOADS, DRAFT, JPEG_LIMITS, LIMIT_BATCHES, NPY,
                                        PHOTO, SHAPE, Archive, Case, ModelSpec, Payload)
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import EXAMPLE_MODEL
from image_embedder_testkit.compare import cosine_min
from image_embedder_testkit.imagenet import IMAGENET
from image_embedder_testkit.ts_server import TorchServe
from image_embedder_tools.build import ArchiveSpec, build_archive

NOOP_HANDLER = '''"""Answers every request at once without reading it: what TorchServe alone costs."""


def handle(data, context):
    if data is None:  # TorchServe's initialization call
        return None
    return [b"[]"] * len(data)
'''


@dataclass
class Measurement:
    """One row: a callable run once per round, its samples, the rows (ids) it is compared with."""

    model: str
    kind: str  # limit | raw | floor | served | decode
    id: str
    name: str
    images_per_call: int
    run: Callable[[], RunResult]
    refs: tuple = ()  # ids of this model's rows the ratio columns divide by
    rounds: list[RunResult] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.id)

    def rates(self) -> list[float]:
        return [r.requests * self.images_per_call / r.wall_s for r in self.rounds]

    def rate(self) -> float:
        """Median images/s over rounds."""
        return statistics.median(self.rates())

    def latencies_ms(self) -> np.ndarray:
        return np.array([x for r in self.rounds for x in r.latencies_s]) * 1000

    def cpu_ms_per_image(self, attr: str) -> float:
        images = sum(r.requests for r in self.rounds) * self.images_per_call
        return 1000 * sum(getattr(r, attr) for r in self.rounds) / max(1, images)

    def errors(self) -> list[str]:
        return [e for r in self.rounds for e in r.errors]


# -- set-up ------------------------------------------------------------------------------------
def make_models(work: str, names: list[str]) -> list[ModelSpec]:
    """The example (weights from its own seed) and the ResNet-18-shaped model (random weights)."""
    specs = []
    if "example" in names:
        folder = os.path.join(work, "example")
        os.makedirs(folder)
        model_file = shutil.copy(EXAMPLE_MODEL, folder)
        spec = importlib.util.spec_from_file_location("_bench_example", model_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        weights = os.path.join(folder, "model_state_dict.pth")
        torch.save(module.CustomModel().state_dict(), weights)
        specs.append(ModelSpec("example", model_file, "CustomModel", weights, "conv1"))
    if "resnet18" in names:
        folder = os.path.join(work, "resnet18")
        os.makedirs(folder)
        model_file = shutil.copy(bench_models.__file__, folder)
        weights = bench_models.make_weights(os.path.join(folder, "resnet18.pth"))
        specs.append(ModelSpec("resnet18", model_file, "ResNet18", weights, "layer4", dict(IMAGENET)))
    return specs


def ts_config(path: str, batch_size: int, delay_ms: int, workers: int = 1) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size,
                        "maxBatchDelay": delay_ms, "responseTimeout": 600}, f)
    return path


def build_noop(store: str, name: str, config: str, work: str) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    handler = os.path.join(work, "noop_handler.py")
    with open(handler, "w") as f:
        f.write(NOOP_HANDLER)
    generate_model_archive(ModelArchiverConfig(model_name=name, handler=handler, version="1.0",
                                               export_path=store, force=True, config_file=config))


def encoder_for(spec: ModelSpec, threads: int, **extra: object) -> ImageEncoder:
    """The same engine the worker runs, in this process."""
    settings = EncoderSettings.from_mapping({
        "model_definition_file": os.path.basename(spec.model_file), "model_class_name": spec.model_class,
        "model_state_dict_path": os.path.basename(spec.state_dict), "layer_name": spec.layer,
        "num_threads": threads, **spec.settings, **extra})
    return ImageEncoder(settings, os.path.dirname(spec.model_file))


def build_store(work: str, specs: list[ModelSpec], archives: list[str], args: argparse.Namespace) -> list[str]:
    """Every archive the cases need (ARCHIVES ids), plus the two no-op floors; returns TorchServe's `models` entries."""
    store = os.path.join(work, "store")
    os.makedirs(store)
    configs = {(b, w): ts_config(os.path.join(work, f"b{b}w{w}.yaml"), b, 0 if b == 1 else args.max_batch_delay, w)
               for b in (1, 16) for w in (1, 2)}
    build_noop(store, "noop", configs[1, 1], work)
    build_noop(store, "noop_dyn", configs[16, 1], work)
    names = ["noop", "noop_dyn"]
    for spec in specs:
        for key in archives:
            archive = ARCHIVES[key]
            build_archive(ArchiveSpec(spec.model_file, spec.model_class, spec.state_dict, spec.layer,
                                      input_shape=list(SHAPE), config_file=configs[archive.batch_size, archive.workers],
                                      name=spec.name + archive.suffix, export_path=store,
                                      settings={"num_threads": args.threads, **spec.settings, **archive.settings}),
                          quiet=True)
            names.append(spec.name + archive.suffix)
    return [f"{n}={n}.mar" for n in names]


def wait_for_archives(server: TorchServe, specs: list[ModelSpec], models: list[str]) -> None:
    """Block until every archive TorchServe serves has its archive's count of READY workers."""
    workers = {spec.name + a.suffix: a.workers for spec in specs for a in ARCHIVES.values()}
    for entry in models:
        name = entry.split("=")[0]
        server.wait_for_workers(name, workers.get(name, 1), timeout=300)


# -- in-process rows ---------------------------------------------------------------------------
def timed(fn: Callable[[], object], calls: int, idle_s: float = 0.0) -> RunResult:
    """`calls` calls of `fn`, each after `idle_s` asleep (not counted in the wall time or latencies)."""
    latencies = []
    slept = 0.0
    cpu0 = time.process_time()
    start = time.perf_counter()
    for _ in range(calls):
        if idle_s:
            t = time.perf_counter()
            time.sleep(idle_s)
            slept += time.perf_counter() - t
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    return RunResult(calls, time.perf_counter() - start - slept, latencies, time.process_time() - cpu0, 0.0)


def best_pass(encoder: ImageEncoder, work: Callable[[], object], batch: int, calls: int,
              idle_s: float = 0.0) -> Callable[[], RunResult]:
    """The fastest of pass sizes 8/16/32 (those <= the batch) for `work`, measured anew each round;
    each call after `idle_s` asleep (see timed)."""
    sizes = [p for p in (8, 16, 32) if p <= batch] or [batch]

    def run() -> RunResult:
        results = []
        for size in sizes:
            encoder.pass_size = size
            results.append(timed(work, calls, idle_s))
        return min(results, key=lambda r: r.wall_s / r.requests)

    for size in sizes:  # warm-up
        encoder.pass_size = size
        work()
    return run


def limit_runner(encoder: ImageEncoder, array: np.ndarray, calls: int, idle_s: float = 0.0) -> Callable[[], RunResult]:
    """What the handler does with a decoded uint8 .npy request: prepare + forward (early exit) + pool;
    with `idle_s`, each request after that long idle, as a lone served request finds its worker."""
    return best_pass(encoder, lambda: encoder.embed_requests([[array]]), len(array), calls, idle_s)


def jpeg_limit_runner(encoder: ImageEncoder, decoder: ImageDecoder, files: tuple, calls: int) -> Callable[[], RunResult]:
    """What the handler does with a multipart JPEG request: parallel decode + prepare + forward."""
    rows = [{f"img{i}": bytearray(data) for i, data in enumerate(files)}]

    def work() -> list:
        decoder.prefetch(rows)
        return encoder.embed_requests([[decoder(v)[0] for v in rows[0].values()]])

    return best_pass(encoder, work, len(files), calls)


def raw_runner(encoder: ImageEncoder, batch: int, calls: int) -> Callable[[], RunResult]:
    """One forward pass (+ hook + pooling) over a prepared float32 batch."""
    prepared = torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(batch))
    encoder.embed_batch(prepared)  # warm-up
    return lambda: timed(lambda: encoder.embed_batch(prepared), calls)


def decode_runner(files: tuple, threads: int) -> Callable[[], RunResult]:
    """The decode stage alone (resize 256, crop 224): all files of one request through the pool."""
    decoder = ImageDecoder("RGB", PHOTO["resize"], PHOTO["center_crop"], threads=threads)
    rows = [{f"img{i}": bytearray(data) for i, data in enumerate(files)}]

    def work() -> list:
        decoder.prefetch(rows)
        return [decoder(v) for v in rows[0].values()]

    work()
    return lambda: timed(work, 1)


def in_process_rows(spec: ModelSpec, payloads: dict[str, Payload], args: argparse.Namespace,
                    boost: int) -> list[Measurement]:
    """limit, raw and JPEG limit rows of one model."""
    rows = []
    encoder = encoder_for(spec, args.threads)
    arrays = {1: payloads["u8_1"].array, 16: payloads["u8_32"].array[:16], 32: payloads["u8_32"].array}
    for batch in LIMIT_BATCHES:
        calls = boost * (8 if batch == 1 else 1)
        rows.append(Measurement(spec.name, "limit", f"limit_b{batch}", f"limit b{batch}", batch,
                                limit_runner(encoder, arrays[batch], calls)))
        rows.append(Measurement(spec.name, "raw", f"raw_b{batch}", f"raw b{batch}", batch,
                                raw_runner(encoder, batch, calls)))
    if spec.name == "example":
        full = encoder_for(spec, args.threads, early_exit=False)
        rows.append(Measurement(spec.name, "raw", "full_forward_b32", "full forward b32", 32,
                                raw_runner(full, 32, boost), ("raw_b32",)))
    threads = default_decode_threads()
    photo_encoder = encoder_for(spec, args.threads, **IMAGENET)
    for limit in JPEG_LIMITS:
        if limit.payload in payloads and spec.name in limit.models:
            decoder = ImageDecoder("RGB", PHOTO["resize"], PHOTO["center_crop"], threads=threads, **limit.decode)
            rows.append(Measurement(spec.name, "limit", limit.id, limit.name, 16,
                                    jpeg_limit_runner(photo_encoder, decoder, payloads[limit.payload].jpegs, 1)))
    return rows


def decode_rows(payloads: dict[str, Payload]) -> list[Measurement]:
    """The decode stage alone on one thread (`decode_<size>_1`) and on the worker's pool (`decode_<size>_all`)."""
    rows = []
    for payload, size in DECODE_PAYLOADS.items():
        if payload not in payloads:
            continue
        one = f"decode_{size}_1"
        for threads in sorted({1, default_decode_threads()}):
            if threads == 1:
                row_id, name, refs = one, f"decode {size}, 1 thread", ()
            else:
                row_id, name, refs = f"decode_{size}_all", f"decode {size}, {threads} threads", (one,)
            rows.append(Measurement("decode", "decode", row_id, name, 16,
                                    decode_runner(payloads[payload].jpegs, threads), refs))
    return rows


# -- served rows -------------------------------------------------------------------------------
def expected_embedding(spec: ModelSpec, payload: Payload, archive: Archive, threads: int) -> np.ndarray:
    """The in-process answer to a payload, with the archive's settings."""
    settings = dict(archive.settings)
    encoder = encoder_for(spec, threads, **settings)
    if payload.jpegs:
        decoder = ImageDecoder("RGB", settings["resize"], settings["center_crop"],
                               jpeg_draft=settings.get("jpeg_draft", False),
                               exact_resize=settings.get("exact_resize", True))
        return encoder.embed_requests([[decoder(f)[0] for f in payload.jpegs]])[0]
    return encoder.embed_requests([[payload.array]])[0]


def served_rows(spec: ModelSpec, cases: list[Case], payloads: dict[str, Payload], server: TorchServe,
                args: argparse.Namespace, checks: dict) -> list[Measurement]:
    """One row per case (warmed up, its answer checked against the in-process one)."""
    rows = []
    pid = server.process.pid
    for case in cases:
        payload = payloads[case.payload]
        path = f"/predictions/{spec.name}{ARCHIVES[case.archive].suffix}"
        warm = run_clients(server.inference_url, path, payload.body, payload.headers, 1, 1, kind=case.client)
        if warm.errors:
            raise RuntimeError(f"{spec.name} {case.name}: {warm.errors[0]}")
        expected = expected_embedding(spec, payload, ARCHIVES[case.archive], args.threads)
        checks[f"{spec.name}/{case.name}"] = served_check(warm.sample, expected, payload.headers.get("Accept") == NPY)
        run = (lambda path=path, p=payload, c=case:
               run_clients(server.inference_url, path, p.body, p.headers, c.clients, c.per_client * args.scale,
                           pid, kind=c.client))
        refs = (case.limit,) + ((case.raw,) if case.raw else ())
        rows.append(Measurement(spec.name, "served", case.id, case.name, payload.images, run, refs))
    return rows


def floor_rows(cases: list[Case], payloads: dict[str, Payload], server: TorchServe,
               args: argparse.Namespace) -> list[Measurement]:
    """The no-op archive on every payload a `floor` case sends, once per payload and client shape."""
    rows, seen = [], set()
    for case in cases:
        batched = ARCHIVES[case.archive].batch_size > 1
        key = (case.payload, case.clients, batched)
        if not case.floor or key in seen:
            continue
        seen.add(key)
        payload = payloads[case.payload]
        path = "/predictions/noop_dyn" if batched else "/predictions/noop"
        run = (lambda path=path, p=payload, c=case:
               run_clients(server.inference_url, path, p.body, p.headers, c.clients, c.per_client * args.scale,
                           server.process.pid, kind=c.client))
        rows.append(Measurement("floor", "floor", case.id, case.name, payload.images, run))
    return rows


def served_check(sample: Optional[bytes], expected: np.ndarray, npy_response: bool) -> Optional[float]:
    """Max abs difference between a served answer and the in-process embedding of the same payload."""
    if sample is None:
        return None
    got = read_npy(sample) if npy_response else np.asarray(json.loads(sample)["embeddings"], np.float32)
    return float(np.abs(got - expected).max())


def run_rounds(measurements: list[Measurement], rounds: int) -> None:
    """Every row once per round, rounds one after another, so load from elsewhere hits every row alike."""
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        for m in measurements:
            m.rounds.append(m.run())


# -- in-process breakdown and options ----------------------------------------------------------
def handler_breakdown(encoder: ImageEncoder, repeats: int) -> dict[str, float]:
    """Milliseconds of each step the handler does around the forward pass, for one batch-32 uint8 request."""
    images = np.random.default_rng(0).integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    body = bytearray(npy_bytes(images))  # what TorchServe hands the handler

    def best(fn: Callable[[], object]) -> float:
        return 1000 * min(timed(fn, 1).wall_s for _ in range(repeats))

    request = decode_request(body, NPY)
    batch = encoder.prepare(request.images)
    embeddings = encoder.embed_prepared(batch)
    parts = {
        "decode (.npy view + checks)": best(lambda: check_request_limits(decode_request(body, NPY), 1024, 32 * 3 * 512 * 512)),
        "prepare (uint8->float32, scale/mean/std)": best(lambda: encoder.prepare(request.images)),
        "encode response .npy": best(lambda: encode_response(embeddings, replace(request, accept=NPY), "m")),
        "encode response JSON": best(lambda: encode_response(embeddings, replace(request, accept=None), "m")),
        "forward+hook+pool": best(lambda: encoder.embed_prepared(batch)),
    }
    own = sum(parts[k] for k in ("decode (.npy view + checks)", "prepare (uint8->float32, scale/mean/std)",
                                 "encode response .npy"))
    parts["own_work_pct_of_forward"] = 100 * own / parts["forward+hook+pool"]
    parts["zero_copy_npy"] = float(np.shares_memory(read_npy(body), np.frombuffer(body, np.uint8)))
    return parts


def option_report(spec: ModelSpec, threads: int, batch: int) -> list[dict]:
    """Speed and accuracy of channels_last / bfloat16 / compile / no early exit against float32 eager."""
    images = torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(7)).numpy()
    base_encoder = encoder_for(spec, threads)
    base = base_encoder.embed(images)
    rows = []
    for label, extra in [("float32 eager", {}), ("channels_last", {"channels_last": True}),
                         ("dtype bfloat16", {"dtype": "bfloat16"}), ("compile", {"compile": True}),
                         ("early_exit off", {"early_exit": False})]:
        try:
            t = time.perf_counter()
            encoder = encoder_for(spec, threads, **extra) if extra else base_encoder
            got = encoder.embed(images)
            first = time.perf_counter() - t
            steady = timed(lambda: encoder.embed(images), 1).wall_s
        except Exception as exc:  # an option this model or machine can't use is reported, not fatal
            rows.append({"model": spec.name, "option": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({"model": spec.name, "option": label, "images_per_s": batch / steady, "first_call_s": first,
                     "max_abs": float(np.abs(got - base).max()),
                     "max_rel": float(np.abs(got - base).max() / np.abs(base).max()),
                     "min_cosine": cosine_min(got, base)})
    return rows


def draft_accuracy(spec: ModelSpec, payloads: dict[str, Payload], threads: int) -> Optional[dict]:
    """Smallest embedding cosine of the fast JPEG paths (crop-window resize; draft) against the exact one."""
    if "jpeg1080_16" not in payloads:
        return None
    files = payloads["jpeg1080_16"].jpegs
    encoder = encoder_for(spec, threads, **IMAGENET)
    out = {}
    for label, extra in (("exact", {}), ("crop-window resize", {"exact_resize": False}), ("draft", DRAFT)):
        decoder = ImageDecoder("RGB", PHOTO["resize"], PHOTO["center_crop"], **extra)
        out[label] = encoder.embed_requests([[decoder(f)[0] for f in files]])[0]
    exact = out.pop("exact")
    # Random-weight features share a large common part: cosine also after removing the photos' mean.
    centre = exact.mean(0)
    return {f"{label}{suffix}": cosine_min(e - c, exact - c)
            for label, e in out.items() for suffix, c in (("", 0.0), (" (centred)", centre))}
