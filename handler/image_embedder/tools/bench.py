#!/usr/bin/env python3
"""Benchmark: the model in-process (raw), TorchServe alone (floor) and our archive (served), in one run.

    python scripts/bench.py            # both models, 3 interleaved rounds (a few minutes)
    python scripts/bench.py --quick    # smoke run: example model only, 1 round (< 60 s)
    python scripts/bench.py --options  # also channels_last / bfloat16 / torch.compile: speed and accuracy

Every served figure is printed as a ratio to the raw figure it must be compared with. Two models:
the example CustomModel (layer conv1) and a ResNet-18-shaped model (bench_models.py, random
weights, layer4, avg pooling, server-side scale/mean/std so uint8 payloads are real pixels).

Two shared cores: raw runs in this process with the same torch thread count as the worker
(`--threads`, default: all cores, one worker), so raw and served use the same compute. The client
is light (one keep-alive http.client connection per thread, bodies encoded once) and its CPU time is
measured and printed per image next to the server's, so what the client took from the cores is
visible. Measurements are interleaved in rounds (raw, floor, served, raw, ...) and the median
round is reported, so load from other processes hits raw and served alike.
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


from image_embedder.tools import bench_models
from image_embedder.tools.bench_client import RunResult, run_clients
from image_embedder.tools.build import ArchiveSpec, build_archive
from image_embedder.encoder import ImageEncoder
from image_embedder.npy_codec import read_npy
from image_embedder.request_decoding import check_request_limits, decode_request
from image_embedder.response_encoding import encode_response
from image_embedder.settings import EncoderSettings
from image_embedder.tools.paths import EXAMPLE_MODEL
from image_embedder.tools.ts_server import TorchServe

SHAPE = (3, 224, 224)
NPY = "application/x-npy"
IMAGENET = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
NOOP_HANDLER = '''"""Answers every request at once without reading it: what TorchServe alone costs."""


def handle(data, context):
    if data is None:  # TorchServe's initialization call
        return None
    return [b"[]"] * len(data)
'''


@dataclass
class ModelSpec:
    """A model to benchmark: its files, layer and handler settings."""

    name: str
    model_file: str
    model_class: str
    state_dict: str
    layer: str
    settings: dict = field(default_factory=dict)


@dataclass
class Measurement:
    """One row of the table: a callable run once per round, its samples, and what raw row it is compared with."""

    model: str
    kind: str  # raw | floor | served | option
    name: str
    images_per_call: int
    run: Callable[[], RunResult]
    ref: Optional[str] = None  # the raw row's name for the ratio
    rounds: list[RunResult] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"

    def rate(self) -> float:
        """Median images/s over rounds."""
        return statistics.median(r.requests * self.images_per_call / r.wall_s for r in self.rounds)

    def latencies_ms(self) -> np.ndarray:
        return np.array([x for r in self.rounds for x in r.latencies_s]) * 1000

    def cpu_ms_per_image(self, attr: str) -> float:
        images = sum(r.requests for r in self.rounds) * self.images_per_call
        return 1000 * sum(getattr(r, attr) for r in self.rounds) / max(1, images)

    def errors(self) -> list[str]:
        return [e for r in self.rounds for e in r.errors]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


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


def ts_config(path: str, batch_size: int, delay_ms: int) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": delay_ms,
                        "responseTimeout": 600}, f)
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
    """The same engine the worker runs, in this process (raw)."""
    settings = EncoderSettings.from_mapping({
        "model_definition_file": os.path.basename(spec.model_file), "model_class_name": spec.model_class,
        "model_state_dict_path": os.path.basename(spec.state_dict), "layer_name": spec.layer,
        "num_threads": threads, **spec.settings, **extra})
    return ImageEncoder(settings, os.path.dirname(spec.model_file))


# -- raw ---------------------------------------------------------------------------------------
def raw_runner(encoder: ImageEncoder, batch: int, calls: int) -> Callable[[], RunResult]:
    """Forward + hook + pooling on a prepared float32 batch: the limit the server is compared with."""
    prepared = torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(batch))

    def run() -> RunResult:
        latencies = []
        cpu0 = time.process_time()
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            encoder.embed_batch(prepared)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        return RunResult(calls, wall, latencies, time.process_time() - cpu0, 0.0)

    encoder.embed_batch(prepared)  # warm-up
    return run


# -- in-process breakdown of the handler's own work ---------------------------------------------
def handler_breakdown(encoder: ImageEncoder, repeats: int) -> dict[str, float]:
    """Milliseconds of each step the handler does around the forward pass, for one batch-32 uint8 request."""
    images = np.random.default_rng(0).integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    body = bytearray(npy_bytes(images))  # what TorchServe hands the handler

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * min(times)

    request = decode_request(body, NPY)
    batch = encoder.prepare(request.images)
    embeddings = encoder.embed_prepared(batch)
    zero_copy = np.shares_memory(read_npy(body), np.frombuffer(body, np.uint8))
    out = {
        "decode (.npy view + checks)": best(lambda: check_request_limits(decode_request(body, NPY), 1024, 32 * 3 * 512 * 512)),
        "prepare (uint8->float32, scale/mean/std)": best(lambda: encoder.prepare(request.images)),
        "encode response .npy": best(lambda: encode_response(embeddings, replace(request, accept=NPY), "m")),
        "encode response JSON": best(lambda: encode_response(embeddings, replace(request, accept=None), "m")),
        "forward+hook+pool": best(lambda: encoder.embed_prepared(batch)),
    }
    out["zero_copy_npy"] = float(zero_copy)
    return out


# -- options: accuracy and speed against float32 eager ------------------------------------------
def option_report(spec: ModelSpec, threads: int, batch: int) -> list[dict]:
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
            t = time.perf_counter()
            got = encoder.embed(images)
            steady = time.perf_counter() - t
        except Exception as exc:  # an option this model or machine can't use is reported, not fatal
            rows.append({"model": spec.name, "option": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        cos = (got * base).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(base, axis=1))
        rows.append({"model": spec.name, "option": label, "images_per_s": batch / steady, "first_call_s": first,
                     "max_abs": float(np.abs(got - base).max()),
                     "max_rel": float(np.abs(got - base).max() / np.abs(base).max()),
                     "min_cosine": float(cos.min())})
    return rows


# -- the run -----------------------------------------------------------------------------------
def served_check(sample: Optional[bytes], expected: np.ndarray, npy_response: bool) -> Optional[float]:
    """Max abs difference between a served answer and the in-process embedding of the same payload."""
    if sample is None:
        return None
    got = read_npy(sample) if npy_response else np.asarray(json.loads(sample)["embeddings"], np.float32)
    return float(np.abs(got - expected).max())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: example model, 1 round, few requests")
    parser.add_argument("--models", default=None, help="comma-separated: example,resnet18 (default both; quick: example)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick: 1)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads per worker and for raw (default: cores - 1, leaving one core to "
                             "TorchServe's frontend and the client)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent single-image clients")
    parser.add_argument("--batch-size", type=int, default=16, help="TorchServe batchSize of the dynamic-batching models")
    parser.add_argument("--max-batch-delay", type=int, default=20, help="maxBatchDelay (ms) of those models")
    parser.add_argument("--options", action="store_true", help="also time channels_last / bfloat16 / compile and their accuracy")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    # SIGTERM (a timeout, CI) must still run the `finally` that stops TorchServe.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    models = (args.models or ("example" if quick else "example,resnet18")).split(",")
    rounds = args.rounds or (1 if quick else 3)
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-")
    server: Optional[TorchServe] = None
    t_start = time.perf_counter()
    try:
        specs = make_models(work, models)
        store = os.path.join(work, "store")
        os.makedirs(store)
        single_cfg = ts_config(os.path.join(work, "single.yaml"), 1, 0)
        dyn_cfg = ts_config(os.path.join(work, "dyn.yaml"), args.batch_size, args.max_batch_delay)
        build_noop(store, "noop", single_cfg, work)
        build_noop(store, "noop_dyn", dyn_cfg, work)
        names = ["noop=noop.mar", "noop_dyn=noop_dyn.mar"]
        for spec in specs:
            handler = {"num_threads": args.threads, **spec.settings}
            for suffix, cfg in (("", single_cfg), ("_dyn", dyn_cfg)):
                build_archive(ArchiveSpec(spec.model_file, spec.model_class, spec.state_dict, spec.layer, input_shape=list(SHAPE),
                              config_file=cfg, name=spec.name + suffix, export_path=store, settings=handler), quiet=True)
                names.append(f"{spec.name}{suffix}={spec.name}{suffix}.mar")
        print(f"archives built in {time.perf_counter() - t_start:.1f}s; starting TorchServe with {len(names)} models",
              flush=True)
        server = TorchServe(store, ",".join(names), overrides={"default_workers_per_model": 1})
        server.start(timeout=300)
        for name in names:
            server.wait_for_workers(name.split("=")[0], 1, timeout=300)
        print(f"TorchServe ready after {time.perf_counter() - t_start:.1f}s", flush=True)
        pid = server.process.pid
        base = server.inference_url
        auth = server.headers()

        rng = np.random.default_rng(0)
        u8_1 = rng.integers(0, 256, SHAPE, dtype=np.uint8)
        u8_32 = rng.integers(0, 256, (32, *SHAPE), dtype=np.uint8)
        f32_1 = u8_1.astype(np.float32) / 255
        f32_32 = u8_32.astype(np.float32) / 255
        bodies = {
            "u8_1": npy_bytes(u8_1), "f32_1": npy_bytes(f32_1), "u8_32": npy_bytes(u8_32), "f32_32": npy_bytes(f32_32),
        }
        if not quick:
            bodies["json_u8_32"] = json.dumps({"data": u8_32.tolist()}, separators=(",", ":")).encode()
            bodies["json_f32_32"] = json.dumps({"data": f32_32.tolist()}, separators=(",", ":")).encode()
        arrays = {"u8_1": u8_1, "f32_1": f32_1, "u8_32": u8_32, "f32_32": f32_32, "json_u8_32": u8_32.astype(np.float32),
                  "json_f32_32": f32_32}
        npy_hdr = {**auth, "Content-Type": NPY, "Accept": NPY}
        json_resp_hdr = {**auth, "Content-Type": NPY}
        json_hdr = {**auth, "Content-Type": "application/json", "Accept": NPY}
        print("payload sizes: " + ", ".join(f"{k} {len(v) / 1e6:.2f} MB" for k, v in bodies.items()), flush=True)

        scale = 1 if quick else 4  # requests per round
        served_cases = [  # name, model suffix, body, headers, clients, per-client requests, images/request, raw ref
            ("1 client, 1 img uint8 .npy", "", "u8_1", npy_hdr, 1, 3 * scale, 1, "raw b1"),
            ("1 client, 1 img float32 .npy", "", "f32_1", npy_hdr, 1, 3 * scale, 1, "raw b1"),
            ("1 client, 1 img uint8, JSON resp", "", "u8_1", json_resp_hdr, 1, 3 * scale, 1, "raw b1"),
            (f"{args.clients} clients, 1 img uint8 .npy", "_dyn", "u8_1", npy_hdr, args.clients, max(1, scale // 2), 1, f"raw b{args.clients}"),
            (f"{args.clients} clients, 1 img float32 .npy", "_dyn", "f32_1", npy_hdr, args.clients, max(1, scale // 2), 1, f"raw b{args.clients}"),
            ("b32 uint8 .npy", "", "u8_32", npy_hdr, 1, 1, 32, "raw b32"),
            ("b32 float32 .npy", "", "f32_32", npy_hdr, 1, 1, 32, "raw b32"),
            ("b32 uint8 .npy, JSON resp", "", "u8_32", json_resp_hdr, 1, 1, 32, "raw b32"),
            ("b32 uint8 as JSON", "", "json_u8_32", json_hdr, 1, 1, 32, "raw b32"),
            ("b32 float32 as JSON", "", "json_f32_32", json_hdr, 1, 1, 32, "raw b32"),
        ]
        served_cases = [c for c in served_cases if c[2] in bodies]
        if quick:  # the smoke run keeps one case of each kind
            served_cases = [c for c in served_cases if "float32" not in c[0] and "as JSON" not in c[0]
                            and not ("1 img" in c[0] and "JSON resp" in c[0])]

        measurements: list[Measurement] = []
        checks: dict[str, Optional[float]] = {}
        for name, suffix, body, headers, clients, per, images, _ in served_cases:
            if "uint8" in name and "JSON" not in name or body.startswith("f32"):
                floor_model = "noop_dyn" if suffix else "noop"
                run = (lambda m=floor_model, b=bodies[body], h=headers, c=clients, p=per:
                       run_clients(base, f"/predictions/{m}", b, h, c, p, pid))
                measurements.append(Measurement("floor", "floor", name, images, run))
        if any(c[2].startswith("json") for c in served_cases):
            measurements.append(Measurement("floor", "floor", "b32 uint8 as JSON", 32,
                                            lambda: run_clients(base, "/predictions/noop", bodies["json_u8_32"], json_hdr, 1, 1, pid)))
        breakdowns: dict[str, dict[str, float]] = {}
        for spec in specs:
            encoder = encoder_for(spec, args.threads)
            # The example's passes take milliseconds: more calls, so one stall does not set the rate.
            boost = 8 if spec.name == "example" else 1
            calls = {1: 3 * scale * boost, 8: max(1, scale // 2) * boost, args.clients: boost, 32: boost}
            for batch in sorted({1, 8, args.clients, 32}):
                measurements.append(Measurement(spec.name, "raw", f"raw b{batch}", batch, raw_runner(encoder, batch, calls.get(batch, 1))))
            if spec.name == "example":
                full = encoder_for(spec, args.threads, early_exit=False)
                for batch in (8,) if quick else (8, 32):
                    measurements.append(Measurement(spec.name, "raw", f"full forward b{batch}", batch, raw_runner(full, batch, calls[batch])))
            for name, suffix, body, headers, clients, per, images, ref in served_cases:
                path = f"/predictions/{spec.name}{suffix}"
                warm = run_clients(base, path, bodies[body], headers, 1, 1)  # warm-up + correctness sample
                if warm.errors:
                    raise RuntimeError(f"{spec.name} {name}: {warm.errors[0]}")
                expected = encoder.embed(arrays[body] if arrays[body].ndim == 4 else arrays[body][None])
                checks[f"{spec.name}/{name}"] = served_check(warm.sample, expected, headers.get("Accept") == NPY)
                run = (lambda path=path, b=bodies[body], h=headers, c=clients, p=per:
                       run_clients(base, path, b, h, c, p, pid))
                measurements.append(Measurement(spec.name, "served", name, images, run, ref))
            breakdowns[spec.name] = handler_breakdown(encoder, 2 if quick else 3)

        for r in range(rounds):
            print(f"round {r + 1}/{rounds} ...", flush=True)
            for m in measurements:
                m.rounds.append(m.run())

        options = []
        if args.options:
            for spec in specs:
                options += option_report(spec, args.threads, 8)

        results = report(measurements, breakdowns, checks, options, args, rounds)
        results["wall_s"] = time.perf_counter() - t_start
        print(f"\nbench finished in {results['wall_s']:.0f}s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 1 if results["errors"] else 0
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------
def report(measurements: list[Measurement], breakdowns: dict, checks: dict, options: list[dict],
           args: argparse.Namespace, rounds: int) -> dict:
    by_key = {m.key: m for m in measurements}
    rows = []
    print(f"\nmachine: {os.cpu_count()} cores shared by client and server (and other users); torch threads "
          f"{args.threads} for raw and per worker, 1 worker per model; {rounds} interleaved round(s), median round shown")
    header = f"{'model':9} {'kind':6} {'measurement':34} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>12} {'cli ms/img':>10} {'srv ms/img':>10}"
    print(header)
    print("-" * len(header))
    for m in measurements:
        lat = m.latencies_ms()
        rate = m.rate()
        ratio_text = ""
        ratio = None
        ref = by_key.get(f"{m.model}/{m.ref}") if m.ref else None
        if ref is not None:
            ratio = rate / ref.rate()
            ratio_text = f"{ratio:.2f}x {m.ref[4:]}"
        client = m.cpu_ms_per_image("client_cpu_s")
        server = m.cpu_ms_per_image("server_cpu_s")
        errors = m.errors()
        print(f"{m.model:9} {m.kind:6} {m.name:34} {rate:8.1f} {np.percentile(lat, 50):8.1f} {np.percentile(lat, 99):8.1f} "
              f"{ratio_text:>12} {client if m.kind != 'raw' else float('nan'):10.2f} {server if m.kind != 'raw' else float('nan'):10.2f}"
              + (f"  ERRORS: {len(errors)} e.g. {errors[0]}" if errors else ""))
        rows.append({"model": m.model, "kind": m.kind, "name": m.name, "images_per_s": rate,
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "ratio_to_raw": ratio, "ref": m.ref, "client_cpu_ms_per_image": client,
                     "server_cpu_ms_per_image": server, "errors": errors})
    print("\nratio: served images/s divided by raw images/s at the batch named (b1/b16/b32) in the same run")
    print("cli/srv ms/img: CPU time of the bench process (client threads) and of TorchServe's process tree, per image")

    print("\nserved answers vs in-process embedding of the same payload (max abs diff):")
    for key, diff in checks.items():
        print(f"  {key:50} {'no sample' if diff is None else f'{diff:.2e}'}")

    print("\nhandler's own work for one batch-32 uint8 .npy request (in process, best of repeats):")
    for model, parts in breakdowns.items():
        fwd = parts["forward+hook+pool"]
        own = parts["decode (.npy view + checks)"] + parts["prepare (uint8->float32, scale/mean/std)"] + parts["encode response .npy"]
        for k, v in parts.items():
            if k != "zero_copy_npy":
                print(f"  {model:9} {k:42} {v:9.2f} ms {100 * v / fwd:7.2f}% of forward")
        print(f"  {model:9} {'own work (decode+prepare+.npy response)':42} {own:9.2f} ms {100 * own / fwd:7.2f}% of forward; "
              f".npy decode zero-copy: {bool(parts['zero_copy_npy'])}")
        parts["own_work_pct_of_forward"] = 100 * own / fwd

    targets = []

    def target(label: str, value: Optional[float], goal: float, unit: str = "x") -> None:
        if value is None:
            return
        ok = value <= goal if unit == "%" else value >= goal
        targets.append({"target": label, "value": value, "goal": goal, "met": ok})
        sign = "<=" if unit == "%" else ">="
        print(f"  {'MET ' if ok else 'MISS'} {label:62} {value:7.2f}{unit} (goal {sign} {goal}{unit})")

    def ratio_of(model: str, name: str, ref: str) -> Optional[float]:
        a, b = by_key.get(f"{model}/{name}"), by_key.get(f"{model}/{ref}")
        return a.rate() / b.rate() if a and b else None

    print("\ntargets:")
    target("resnet18: b32 uint8 .npy served / raw b32", ratio_of("resnet18", "b32 uint8 .npy", "raw b32"), 0.90)
    target(f"resnet18: {args.clients} clients 1 img uint8 (dynamic batching) / raw b{args.clients}",
           ratio_of("resnet18", f"{args.clients} clients, 1 img uint8 .npy", f"raw b{args.clients}"), 0.70)
    if "resnet18" in breakdowns:
        target("resnet18: handler's own work at b32, % of forward", breakdowns["resnet18"]["own_work_pct_of_forward"], 3.0, "%")
    for b in (8, 32):
        target(f"example: conv1 early exit / full forward, b{b}", ratio_of("example", f"raw b{b}", f"full forward b{b}"), 3.0)

    if options:
        print("\noptions (batch 8, vs float32 eager of the same encoder):")
        for o in options:
            if "error" in o:
                print(f"  {o['model']:9} {o['option']:16} not usable: {o['error'][:150]}")
            else:
                print(f"  {o['model']:9} {o['option']:16} {o['images_per_s']:7.1f} img/s  first call {o['first_call_s']:6.1f}s  "
                      f"max abs {o['max_abs']:.2e}  max rel {o['max_rel']:.2e}  min cosine {o['min_cosine']:.7f}")
    errors = [e for r in rows for e in r["errors"]]
    bad_checks = {k: v for k, v in checks.items() if v is not None and v > 1e-3}
    if bad_checks:
        errors.append(f"served embeddings differ from in-process ones: {bad_checks}")
        print(f"\nERROR: {errors[-1]}")
    return {"rows": rows, "breakdown": breakdowns, "checks": checks, "targets": targets, "options": options,
            "errors": errors, "threads": args.threads, "rounds": rounds, "cores": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
