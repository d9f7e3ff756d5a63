#!/usr/bin/env python3
"""Benchmark: each model in process (limit, raw), TorchServe alone (floor) and our archive (served), in one run.

    .venv/bin/python scripts/bench.py            # both models, 3 interleaved rounds (several minutes)
    .venv/bin/python scripts/bench.py --quick    # smoke run: example model, 1 round, few requests
    .venv/bin/python scripts/bench.py --options  # also channels_last / bfloat16 / compile: speed and accuracy

Rows, per model (the example CustomModel at conv1; a ResNet-18-shaped model at layer4, bench_models.py):
- limit: the engine (ImageEncoder) in this process on the payload the server gets (uint8 -> prepare ->
  forward with early exit), best pass size of 8/16/32, the worker's torch threads; for JPEG payloads,
  decode (thread pool, as the worker) + prepare + forward. Every served row is a ratio to its limit.
- raw: one forward pass over a prepared float32 batch (the first round's reference; kept).
- floor: a no-op archive answering the same payload: what TorchServe alone costs.
- served: our archive, from three kinds of client: `light` (one keep-alive http.client connection),
  `requests` (a requests.Session, what a user writes), and several threads = several requests in flight.
- decode: the JPEG decode stage alone, 1 thread and all cores.

Rows are measured in rounds, interleaved (every row once per round), and the median round is shown
with the spread (min-max), so load from other processes hits every row alike. The load average is
printed: on a shared machine, read the figures with it.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
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
from image_embedder.tools import bench_models
from image_embedder.tools.bench_client import RunResult, run_clients
from image_embedder.tools.bench_photos import jpegs
from image_embedder.tools.build import ArchiveSpec, build_archive
from image_embedder.tools.paths import EXAMPLE_MODEL
from image_embedder.tools.ts_server import TorchServe

SHAPE = (3, 224, 224)
NPY = "application/x-npy"
IMAGENET = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PHOTO = {"resize": 256, "center_crop": 224}  # server-side preprocessing of the JPEG archives
DRAFT = {"jpeg_draft": True, "exact_resize": False}
NOOP_HANDLER = '''"""Answers every request at once without reading it: what TorchServe alone costs."""


def handle(data, context):
    if data is None:  # TorchServe's initialization call
        return None
    return [b"[]"] * len(data)
'''


# -- what is measured --------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model to benchmark: its files, layer and handler settings."""

    name: str
    model_file: str
    model_class: str
    state_dict: str
    layer: str
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Archive:
    """One served archive of a model: a name suffix, TorchServe batching, extra handler settings."""

    suffix: str
    batch_size: int = 1
    settings: tuple = ()  # (key, value) pairs over the model's own settings
    workers: int = 1


ARCHIVES = {
    "single": Archive(""),
    "w2": Archive("_w2", settings=(("num_threads", 1),), workers=2),  # docs/performance.md: the CPU layout
    "dyn": Archive("_dyn", batch_size=16),
    "img": Archive("_img", settings=tuple({**IMAGENET, **PHOTO}.items())),
    "img_dyn": Archive("_img_dyn", batch_size=16, settings=tuple({**IMAGENET, **PHOTO}.items())),
    "img_draft": Archive("_img_draft", settings=tuple({**IMAGENET, **PHOTO, **DRAFT}.items())),
}


PAYLOADS = ("u8_1", "u8_32", "u8_32_json_resp", "f32_32", "json_u8_32", "jpeg640_16", "jpeg1080_16", "jpeg1080_1")


@dataclass
class Payload:
    """A request body, encoded once: its headers, how many images it holds, what the server sees."""

    body: bytes
    headers: dict
    images: int
    array: Optional[np.ndarray] = None  # .npy/JSON payloads: the images as sent
    jpegs: tuple = ()  # JPEG payloads: the encoded images


@dataclass(frozen=True)
class Case:
    """One served row: archive, payload, client kind and shape, the limit it is compared with."""

    name: str
    archive: str
    payload: str
    limit: str
    raw: Optional[str] = None
    client: str = "light"
    clients: int = 1
    per_client: int = 1  # requests per client per round, times --scale
    quick: bool = False  # part of the --quick smoke run
    floor: bool = False  # also time the no-op archive on this payload
    models: tuple = ("example", "resnet18")


CASES = [
    Case("1 client, 1 img uint8 .npy", "single", "u8_1", "limit b1", "raw b1", per_client=12, quick=True, floor=True),
    Case("16 clients, 1 img uint8 .npy", "dyn", "u8_1", "limit b16", "raw b16", clients=16, per_client=2,
         quick=True, floor=True),
    Case("16 clients, 1 img uint8 .npy, requests", "dyn", "u8_1", "limit b16", "raw b16", "requests", 16, 2),
    Case("b32 uint8 .npy", "single", "u8_32", "limit b32", "raw b32", per_client=4, quick=True, floor=True),
    Case("b32 uint8 .npy, requests", "single", "u8_32", "limit b32", "raw b32", "requests", per_client=4, quick=True),
    Case("b32 uint8 .npy, requests, 2 in flight", "single", "u8_32", "limit b32", "raw b32", "requests", 2, 2,
         quick=True),
    Case("b32 uint8 .npy, requests, 2 in flight, 2 workers x 1 thread", "w2", "u8_32", "limit b32", "raw b32",
         "requests", 2, 2),
    Case("b32 float32 .npy, requests", "single", "f32_32", "limit b32", "raw b32", "requests", per_client=2),
    Case("b32 uint8 .npy, JSON resp, requests", "single", "u8_32_json_resp", "limit b32", "raw b32", "requests",
         per_client=2),
    Case("b32 uint8 as JSON, requests", "single", "json_u8_32", "limit b32", "raw b32", "requests", per_client=1,
         floor=True),
    Case("16 JPEG 640x480 multipart, requests", "img", "jpeg640_16", "jpeg limit 640x480", client="requests",
         per_client=2, quick=True),
    Case("16 JPEG 640x480 multipart, requests, 2 in flight", "img", "jpeg640_16", "jpeg limit 640x480",
         client="requests", clients=2, per_client=1),
    Case("16 JPEG 1920x1080 multipart, requests", "img", "jpeg1080_16", "jpeg limit 1920x1080",
         client="requests", per_client=1, floor=True, models=("resnet18",)),
    Case("16 clients, 1 JPEG 1920x1080", "img_dyn", "jpeg1080_1", "jpeg limit 1920x1080", clients=16,
         per_client=1, models=("resnet18",)),
    Case("16 JPEG 1920x1080 multipart, draft", "img_draft", "jpeg1080_16", "jpeg limit 1920x1080 draft",
         client="requests", per_client=1, models=("resnet18",)),
]


@dataclass
class Measurement:
    """One row: a callable run once per round, its samples, the rows it is compared with."""

    model: str
    kind: str  # limit | raw | floor | served | decode
    name: str
    images_per_call: int
    run: Callable[[], RunResult]
    refs: tuple = ()  # names of this model's rows the ratio columns divide by
    rounds: list[RunResult] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"

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


# -- payloads ----------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def multipart(files: tuple) -> tuple[bytes, str]:
    """One multipart/form-data body, a part per image (distinct names: TorchServe keys parts by name)."""
    import urllib3

    fields = [(f"img{i}", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(files)]
    return urllib3.encode_multipart_formdata(fields)


def make_payloads(auth: dict, quick: bool) -> dict[str, Payload]:
    rng = np.random.default_rng(0)
    u8_1 = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    u8_32 = rng.integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    npy_hdr = {**auth, "Content-Type": NPY, "Accept": NPY}
    payloads = {
        "u8_1": Payload(npy_bytes(u8_1), npy_hdr, 1, u8_1[None]),
        "u8_32": Payload(npy_bytes(u8_32), npy_hdr, 32, u8_32),
        "u8_32_json_resp": Payload(npy_bytes(u8_32), {**auth, "Content-Type": NPY}, 32, u8_32),
    }
    photos = {"jpeg640_16": jpegs(16, 640, 480, 1)}
    if not quick:
        f32_32 = u8_32.astype(np.float32) / 255
        payloads["f32_32"] = Payload(npy_bytes(f32_32), npy_hdr, 32, f32_32)
        json_body = json.dumps({"data": u8_32.tolist()}, separators=(",", ":")).encode()
        payloads["json_u8_32"] = Payload(json_body, {**auth, "Content-Type": "application/json", "Accept": NPY},
                                         32, u8_32.astype(np.float32))
        photos["jpeg1080_16"] = jpegs(16, 1920, 1080, 2)
    for name, files in photos.items():
        body, content_type = multipart(files)
        payloads[name] = Payload(body, {**auth, "Content-Type": content_type, "Accept": NPY}, len(files), jpegs=files)
    if "jpeg1080_16" in photos:
        one = photos["jpeg1080_16"][0]
        payloads["jpeg1080_1"] = Payload(one, {**auth, "Content-Type": "image/jpeg", "Accept": NPY}, 1, jpegs=(one,))
    return payloads


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
    """Every archive the cases need, plus the two no-op floors; returns TorchServe's `models` entries."""
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
                                      settings={"num_threads": args.threads, **spec.settings, **dict(archive.settings)}),
                          quiet=True)
            names.append(spec.name + archive.suffix)
    return [f"{n}={n}.mar" for n in names]


# -- in-process rows ---------------------------------------------------------------------------
def timed(fn: Callable[[], object], calls: int) -> RunResult:
    latencies = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    return RunResult(calls, time.perf_counter() - start, latencies, time.process_time() - cpu0, 0.0)


def best_pass(encoder: ImageEncoder, work: Callable[[], object], batch: int, calls: int) -> Callable[[], RunResult]:
    """The fastest of pass sizes 8/16/32 (those <= the batch) for `work`, measured anew each round."""
    sizes = [p for p in (8, 16, 32) if p <= batch] or [batch]

    def run() -> RunResult:
        results = []
        for size in sizes:
            encoder.pass_size = size
            results.append(timed(work, calls))
        return min(results, key=lambda r: r.wall_s / r.requests)

    for size in sizes:  # warm-up
        encoder.pass_size = size
        work()
    return run


def limit_runner(encoder: ImageEncoder, array: np.ndarray, calls: int) -> Callable[[], RunResult]:
    """What the handler does with a decoded uint8 .npy request: prepare + forward (early exit) + pool."""
    return best_pass(encoder, lambda: encoder.embed_requests([[array]]), len(array), calls)


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
    """limit, raw, JPEG limit and decode rows of one model."""
    rows = []
    encoder = encoder_for(spec, args.threads)
    for batch, payload in ((1, "u8_1"), (16, None), (32, "u8_32")):
        array = payloads[payload].array if payload else payloads["u8_32"].array[:16]
        calls = boost * (8 if batch == 1 else 1)
        rows.append(Measurement(spec.name, "limit", f"limit b{batch}", batch, limit_runner(encoder, array, calls)))
        rows.append(Measurement(spec.name, "raw", f"raw b{batch}", batch, raw_runner(encoder, batch, calls)))
    if spec.name == "example":
        full = encoder_for(spec, args.threads, early_exit=False)
        rows.append(Measurement(spec.name, "raw", "full forward b32", 32, raw_runner(full, 32, boost), ("raw b32",)))
    threads = default_decode_threads()
    photo_encoder = encoder_for(spec, args.threads, **IMAGENET)
    for payload, label, extra in (("jpeg640_16", "640x480", {}), ("jpeg1080_16", "1920x1080", {}),
                                  ("jpeg1080_16", "1920x1080 draft", DRAFT)):
        if payload in payloads and (spec.name == "resnet18" or payload == "jpeg640_16"):
            decoder = ImageDecoder("RGB", PHOTO["resize"], PHOTO["center_crop"], threads=threads, **extra)
            rows.append(Measurement(spec.name, "limit", f"jpeg limit {label}", 16,
                                    jpeg_limit_runner(photo_encoder, decoder, payloads[payload].jpegs, 1)))
    return rows


def decode_rows(payloads: dict[str, Payload]) -> list[Measurement]:
    rows = []
    for payload, label in (("jpeg640_16", "640x480"), ("jpeg1080_16", "1920x1080")):
        if payload in payloads:
            one = f"decode {label}, 1 thread"
            for threads in sorted({1, default_decode_threads()}):
                name = one if threads == 1 else f"decode {label}, {threads} threads"
                rows.append(Measurement("decode", "decode", name, 16, decode_runner(payloads[payload].jpegs, threads),
                                        () if threads == 1 else (one,)))
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
        rows.append(Measurement(spec.name, "served", case.name, payload.images, run, refs))
    return rows


def floor_rows(cases: list[Case], payloads: dict[str, Payload], server: TorchServe,
               args: argparse.Namespace) -> list[Measurement]:
    """The no-op archive on every payload a `floor` case sends, once per payload and client shape."""
    rows, seen = [], set()
    for case in cases:
        key = (case.payload, case.clients, case.archive.endswith("dyn"))
        if not case.floor or key in seen:
            continue
        seen.add(key)
        payload = payloads[case.payload]
        path = "/predictions/noop_dyn" if key[2] else "/predictions/noop"
        run = (lambda path=path, p=payload, c=case:
               run_clients(server.inference_url, path, p.body, p.headers, c.clients, c.per_client * args.scale,
                           server.process.pid, kind=c.client))
        rows.append(Measurement("floor", "floor", case.name, payload.images, run))
    return rows


def served_check(sample: Optional[bytes], expected: np.ndarray, npy_response: bool) -> Optional[float]:
    """Max abs difference between a served answer and the in-process embedding of the same payload."""
    if sample is None:
        return None
    got = read_npy(sample) if npy_response else np.asarray(json.loads(sample)["embeddings"], np.float32)
    return float(np.abs(got - expected).max())


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
        cos = (got * base).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(base, axis=1))
        rows.append({"model": spec.name, "option": label, "images_per_s": batch / steady, "first_call_s": first,
                     "max_abs": float(np.abs(got - base).max()),
                     "max_rel": float(np.abs(got - base).max() / np.abs(base).max()),
                     "min_cosine": float(cos.min())})
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


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


# -- the run -----------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: example model, 1 round, few requests")
    parser.add_argument("--models", default=None, help="comma-separated: example,resnet18 (default both; quick: example)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick: 1)")
    parser.add_argument("--scale", type=int, default=None, help="multiplies requests per round (default 1)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads per worker and in process (default: cores - 1, leaving one core to "
                             "TorchServe's frontend and the client)")
    parser.add_argument("--max-batch-delay", type=int, default=20, help="maxBatchDelay (ms) of the batchSize-16 archives")
    parser.add_argument("--payloads", default=None,
                        help="only the served cases sending these payloads, comma-separated: " + ", ".join(PAYLOADS))
    parser.add_argument("--options", action="store_true", help="also time channels_last / bfloat16 / compile and their accuracy")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args(argv)
    args.models = (args.models or ("example" if args.quick else "example,resnet18")).split(",")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.scale = args.scale or 1
    return args


def select_cases(args: argparse.Namespace, payloads: dict[str, Payload]) -> list[Case]:
    cases = [c for c in CASES if c.payload in payloads and (c.quick or not args.quick)]
    if args.payloads:
        cases = [c for c in cases if c.payload in args.payloads.split(",")]
    return cases


def run_rounds(measurements: list[Measurement], rounds: int) -> None:
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        for m in measurements:
            m.rounds.append(m.run())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop TorchServe
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-")
    server: Optional[TorchServe] = None
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    try:
        specs = make_models(work, args.models)
        payloads = make_payloads({}, args.quick)
        cases = select_cases(args, payloads)
        archives = sorted({c.archive for c in cases})
        models = build_store(work, specs, archives, args)
        print(f"{len(models)} archives built in {time.perf_counter() - t_start:.1f}s", flush=True)
        server = TorchServe(os.path.join(work, "store"), ",".join(models), overrides={"default_workers_per_model": 1})
        server.start(timeout=300)
        workers = {spec.name + a.suffix: a.workers for spec in specs for a in ARCHIVES.values()}
        for entry in models:
            name = entry.split("=")[0]
            server.wait_for_workers(name, workers.get(name, 1), timeout=300)
        print(f"TorchServe ready after {time.perf_counter() - t_start:.1f}s", flush=True)
        for payload in payloads.values():
            payload.headers.update(server.headers())
        boost = 1 if args.quick else 2
        measurements: list[Measurement] = decode_rows(payloads)
        checks: dict[str, Optional[float]] = {}
        breakdowns = {}
        measurements += floor_rows(cases, payloads, server, args)
        for spec in specs:
            mine = [c for c in cases if spec.name in c.models]
            measurements += in_process_rows(spec, payloads, args, boost * (4 if spec.name == "example" else 1))
            measurements += served_rows(spec, mine, payloads, server, args, checks)
            breakdowns[spec.name] = handler_breakdown(encoder_for(spec, args.threads), 2 if args.quick else 3)
        run_rounds(measurements, args.rounds)
        extras = {"options": [o for s in specs for o in option_report(s, args.threads, 8)] if args.options else [],
                  "draft_cosine": {s.name: draft_accuracy(s, payloads, args.threads) for s in specs}}
        results = report(measurements, breakdowns, checks, extras, args)
        results.update(wall_s=time.perf_counter() - t_start, load_before=load_before, load_after=os.getloadavg())
        print(f"\nbench finished in {results['wall_s']:.0f}s; load average before {load_before[0]:.2f}, "
              f"after {results['load_after'][0]:.2f} (1 min)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 1 if results["errors"] else 0
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------
def ratios(m: Measurement, by_key: dict[str, Measurement]) -> dict[str, float]:
    out = {}
    for ref in m.refs:
        other = by_key.get(f"{m.model}/{ref}")
        if other is not None:
            out[ref] = m.rate() / other.rate()
    return out


def table_row(m: Measurement, by_key: dict[str, Measurement]) -> dict:
    lat = m.latencies_ms()
    rates = m.rates()
    return {"model": m.model, "kind": m.kind, "name": m.name, "images_per_s": m.rate(),
            "spread": [min(rates), max(rates)], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "ratios": ratios(m, by_key),
            "client_cpu_ms_per_image": m.cpu_ms_per_image("client_cpu_s") if m.kind in ("served", "floor") else None,
            "server_cpu_ms_per_image": m.cpu_ms_per_image("server_cpu_s") if m.kind in ("served", "floor") else None,
            "errors": m.errors()}


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmachine: {os.cpu_count()} cores shared by client and server (and other users); torch threads "
          f"{args.threads} in process and per worker; {args.rounds} interleaved round(s): median, spread min-max")
    header = (f"{'model':9} {'kind':6} {'measurement':50} {'img/s':>8} {'spread':>13} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'cli/srv ms/img':>15}  ratios")
    print(header)
    print("-" * (len(header) + 30))
    for r in rows:
        spread = f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f}"
        cpu = (f"{r['client_cpu_ms_per_image']:.2f}/{r['server_cpu_ms_per_image']:.2f}"
               if r["client_cpu_ms_per_image"] is not None else "")
        ratio = "  ".join(f"{v:.2f}x {k}" for k, v in r["ratios"].items())
        errors = f"  ERRORS: {len(r['errors'])} e.g. {r['errors'][0]}" if r["errors"] else ""
        print(f"{r['model']:9} {r['kind']:6} {r['name']:50} {r['images_per_s']:8.1f} {spread:>13} {r['p50_ms']:8.1f} "
              f"{r['p99_ms']:8.1f} {cpu:>15}  {ratio}{errors}")
    print("ratios: this row's images/s over the named row's, same model, same run; cli/srv: CPU ms per image of "
          "the bench process (clients) and of TorchServe's process tree")


def print_checks(checks: dict, breakdowns: dict, extras: dict) -> None:
    print("\nserved answers vs in-process embedding of the same payload (max abs diff):")
    for key, diff in checks.items():
        print(f"  {key:60} {'no sample' if diff is None else f'{diff:.2e}'}")
    print("\nhandler's own work for one batch-32 uint8 .npy request (in process, best of repeats):")
    for model, parts in breakdowns.items():
        for k, v in parts.items():
            if k not in ("zero_copy_npy", "own_work_pct_of_forward"):
                print(f"  {model:9} {k:42} {v:9.2f} ms")
        print(f"  {model:9} own work (decode+prepare+.npy response) = {parts['own_work_pct_of_forward']:.2f}% of forward;"
              f" .npy decode zero-copy: {bool(parts['zero_copy_npy'])}")
    for model, cosines in extras["draft_cosine"].items():
        if cosines:
            print(f"  {model:9} JPEG 1920x1080, min embedding cosine vs exact decode: "
                  + ", ".join(f"{k} {v:.5f}" for k, v in cosines.items()))
    for o in extras["options"]:
        if "error" in o:
            print(f"  option {o['model']:9} {o['option']:16} not usable: {o['error'][:150]}")
        else:
            print(f"  option {o['model']:9} {o['option']:16} {o['images_per_s']:7.1f} img/s  first call "
                  f"{o['first_call_s']:6.1f}s  max abs {o['max_abs']:.2e}  min cosine {o['min_cosine']:.7f}")


TARGETS = [  # (label, model, row, ref row, goal); a goal on "%" is a ceiling
    ("example b32 uint8, requests x2 in flight / limit", "example", "b32 uint8 .npy, requests, 2 in flight", "limit b32", 0.70),
    ("example b32 uint8, one requests client / limit", "example", "b32 uint8 .npy, requests", "limit b32", 0.50),
    ("resnet18 b32 uint8, requests / limit", "resnet18", "b32 uint8 .npy, requests", "limit b32", 0.90),
    ("resnet18 16 clients 1 img / limit b16", "resnet18", "16 clients, 1 img uint8 .npy", "limit b16", 0.90),
    ("resnet18 16 JPEG 640x480 multipart / JPEG limit", "resnet18", "16 JPEG 640x480 multipart, requests",
     "jpeg limit 640x480", 0.85),
    ("resnet18 16 JPEG 1920x1080 multipart / JPEG limit", "resnet18", "16 JPEG 1920x1080 multipart, requests",
     "jpeg limit 1920x1080", 0.85),
    ("decode 1920x1080: all cores / 1 thread", "decode", f"decode 1920x1080, {default_decode_threads()} threads",
     "decode 1920x1080, 1 thread", 1.7),
]


def print_targets(by_key: dict[str, Measurement], breakdowns: dict) -> list[dict]:
    out = []
    print("\ntargets (issue 8):")
    for label, model, row, ref, goal in TARGETS:
        a, b = by_key.get(f"{model}/{row}"), by_key.get(f"{model}/{ref}")
        if a and b:
            out.append({"target": label, "value": a.rate() / b.rate(), "goal": goal})
    if "resnet18" in breakdowns:
        out.append({"target": "resnet18 handler's own work, % of forward (at most)",
                    "value": breakdowns["resnet18"]["own_work_pct_of_forward"], "goal": 3.0, "ceiling": True})
    for t in out:
        t["met"] = t["value"] <= t["goal"] if t.get("ceiling") else t["value"] >= t["goal"]
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']:56} {t['value']:7.2f} (goal "
              f"{'<=' if t.get('ceiling') else '>='} {t['goal']})")
    return out


def report(measurements: list[Measurement], breakdowns: dict, checks: dict, extras: dict,
           args: argparse.Namespace) -> dict:
    by_key = {m.key: m for m in measurements}
    rows = [table_row(m, by_key) for m in measurements]
    print_table(rows, args)
    print_checks(checks, breakdowns, extras)
    targets = print_targets(by_key, breakdowns)
    errors = [e for r in rows for e in r["errors"]]
    bad = {k: v for k, v in checks.items() if v is not None and v > 1e-3}
    if bad:
        errors.append(f"served embeddings differ from in-process ones: {bad}")
        print(f"\nERROR: {errors[-1]}")
    return {"rows": rows, "breakdown": breakdowns, "checks": checks, "targets": targets, "errors": errors,
            "threads": args.threads, "rounds": args.rounds, "cores": os.cpu_count(), **extras}


if __name__ == "__main__":
    sys.exit(main())
