"""The fixed cost of a request: TorchServe's transport, ours, and the model, for a tiny and a b32 request.

    .venv/bin/image-embedder bench-breakdown            # 4 interleaved rounds of 12 requests per row
    .venv/bin/image-embedder bench-breakdown --quick    # smoke run: shipped defaults only, 1 round

One TorchServe per environment serves, side by side, the example model at conv1 built with the
shipped defaults (one worker per core, shared threads, batchSize 16, maxBatchDelay 5 ms) and two
no-op archives that answer without reading the body: one batched as ours (what TorchServe's
batching costs a lone request), one with batchSize 1 (TorchServe's transport). A sequential
requests.Session client sends each payload, uint8 .npy in and out: tiny (1x3x8x8) and b32
(32x3x224x224, 4.8 MB). In this process, the model's own time for the same payload: the engine
(`ImageEncoder.embed_requests`) with every core, its best pass of 8/16/32, malloc thresholds as
a worker has them.

    ours = our archive - the no-op batched as ours - the model in process

Each variant of ours turns one of the worker's defaults off, to show what it is worth: the
malloc thresholds (`reuse_freed_memory`, an archive setting) and how OpenMP's threads wait (the
server's environment, hence a TorchServe per environment). Every row runs once per round, in order, rounds
one after another; medians and p90 over every request of every round. One answer of each archive
is compared with the engine's embedding of the same payload in process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np
import torch
import yaml

from image_embedder.allocator import reuse_freed_memory
from image_embedder_bench.bench_client import run_clients
from image_embedder_bench.cases import NPY, SHAPE, ModelSpec
from image_embedder_bench.json_out import write_json
from image_embedder_bench.measure import (Measurement, build_noop, encoder_for, limit_runner, make_models,
                                          run_rounds, served_check)
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.ts_server import TorchServe
from image_embedder_tools.build import ArchiveSpec, build_archive

PAYLOADS = {"tiny": (1, 3, 8, 8), "b32": (32, *SHAPE)}
LAUNCHERS = {}  # the launchers' environment (GOMP_SPINCOUNT=10000), as the test kit's TorchServe sets it
SPINNING = {"GOMP_SPINCOUNT": None}  # libgomp's default: threads spin ~10 ms after each parallel region
PASSIVE = {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"}  # threads sleep at once


@dataclass(frozen=True)
class Variant:
    """Our archive with some of the worker's defaults changed: handler settings, the server's environment."""

    id: str
    name: str
    settings: Mapping[str, object] = field(default_factory=dict)
    env: Mapping[str, Optional[str]] = field(default_factory=lambda: LAUNCHERS)


VARIANTS = (
    Variant("shipped", "our archive, shipped defaults"),
    Variant("faulting", "  without reuse_freed_memory", {"reuse_freed_memory": False}),
    Variant("spinning", "  with libgomp's spin count", env=SPINNING),
    Variant("before", "  with neither (no reuse, libgomp's spin)", {"reuse_freed_memory": False}, SPINNING),
    Variant("passive", "  with OMP_WAIT_POLICY=PASSIVE instead", env=PASSIVE),
)
IDLE_S = 0.01  # the model_idle row's pause before each call: about a served request's round trip
NOOPS = {"noop_b1": ("no-op, batchSize 1 (transport)", 1), "noop_dyn": ("no-op, batched as ours", 16)}
MODEL_ROWS = {"model": "the model in process", "model_idle": f"  each call after {IDLE_S * 1000:.0f} ms idle"}


@dataclass
class Server:
    """One TorchServe and the archives it serves (their names)."""

    env: Mapping[str, Optional[str]]
    store: str
    archives: list[str]
    ts: Optional[TorchServe] = None


def build_servers(work: str, spec: ModelSpec, variants: list[Variant]) -> list[Server]:
    """The archives, in one model store per environment; the no-ops with the first."""
    servers: list[Server] = []
    for variant in variants:
        server = next((s for s in servers if s.env == variant.env), None)
        if server is None:
            server = Server(variant.env, os.path.join(work, f"store{len(servers)}"), [])
            os.makedirs(server.store)
            if not servers:
                for name, (_, batch) in NOOPS.items():  # no worker count: one per core, as ours
                    config = os.path.join(work, f"{name}.yaml")
                    with open(config, "w") as f:
                        yaml.safe_dump({"batchSize": batch, "maxBatchDelay": 5 if batch > 1 else 0}, f)
                    build_noop(server.store, name, config, work)
                    server.archives.append(name)
            servers.append(server)
        build_archive(ArchiveSpec(spec.model_file, spec.model_class, spec.state_dict, spec.layer,
                                  input_shape=list(SHAPE), name=variant.id, export_path=server.store,
                                  settings=dict(variant.settings)), quiet=True)
        server.archives.append(variant.id)
    return servers


def start(server: Server) -> None:
    server.ts = TorchServe(server.store, ",".join(f"{n}={n}.mar" for n in server.archives), env=dict(server.env))
    server.ts.start(timeout=300)
    for name in server.archives:
        server.ts.wait_for_workers(name, os.cpu_count() or 1, timeout=300)


def served_row(server: TorchServe, archive: str, name: str, payload: str, body: bytes, count: int) -> Measurement:
    headers = {**server.headers(), "Content-Type": NPY, "Accept": NPY}
    run = (lambda: run_clients(server.inference_url, f"/predictions/{archive}", body, headers, 1, count,
                               server.process.pid, kind="requests"))
    return Measurement(archive, "served", payload, name, PAYLOADS[payload][0], run)


def model_row(encoder, array: np.ndarray, payload: str, count: int, idle_s: float = 0.0) -> Measurement:
    """The engine in process (measure.limit_runner: its best pass size, measured anew each round); with
    `idle_s`, each call after that long idle (threads asleep, caches cold)."""
    key = "model_idle" if idle_s else "model"
    return Measurement(key, "limit", payload, MODEL_ROWS[key], len(array), limit_runner(encoder, array, count, idle_s))


def stats(m: Measurement) -> dict[str, float]:
    lat = m.latencies_ms()
    return {"median_ms": float(np.median(lat)), "p90_ms": float(np.percentile(lat, 90))}


def table(rows: dict[tuple[str, str], dict], variants: list[Variant]) -> list[dict]:
    """The printed table: each row's median and p90 per payload, then ours and served/model per variant."""
    out = []
    names = {**{k: v[0] for k, v in NOOPS.items()}, **MODEL_ROWS,
             **{v.id: v.name for v in variants}}
    for key, name in names.items():
        out.append({"id": key, "name": name, **{p: rows[(key, p)] for p in PAYLOADS}})
        if key in {v.id for v in variants}:
            def ours(model: str, key: str = key) -> dict[str, float]:
                return {p: rows[(key, p)]["median_ms"] - rows[("noop_dyn", p)]["median_ms"] - rows[(model, p)]["median_ms"]
                        for p in PAYLOADS}

            spread = {p: rows[(key, p)]["p90_ms"] / rows[(key, p)]["median_ms"] for p in PAYLOADS}
            out[-1].update(ours_ms=ours("model"), ours_after_idle_ms=ours("model_idle"), p90_over_median=spread,
                           model_over_served=rows[("model", "b32")]["median_ms"] / rows[(key, "b32")]["median_ms"])
    return out


def print_table(lines: list[dict]) -> None:
    print(f"\n{'ms per request (median / p90)':44} {'tiny':>15} {'b32':>15}\n"
          f"{'(ours: - the model / - the model after idle)':44}")
    for line in lines:
        cells = "".join(f"{line[p]['median_ms']:8.1f} /{line[p]['p90_ms']:6.1f}" for p in PAYLOADS)
        print(f"{line['name']:44} {cells}")
        if "ours_ms" in line:
            print(f"{'    ours = archive - no-op batched - model':44} "
                  + "".join(f"{line['ours_ms'][p]:8.1f} /{line['ours_after_idle_ms'][p]:6.1f}" for p in PAYLOADS)
                  + f"   p90/median b32 {line['p90_over_median']['b32']:.2f}, model/served b32 "
                  f"{line['model_over_served']:.2f}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: shipped defaults only, 1 round, 3 requests")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4; quick 1)")
    parser.add_argument("--requests", type=int, default=None, help="requests per row per round (default 12; quick 3)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    rounds, count = args.rounds or (1 if args.quick else 4), args.requests or (3 if args.quick else 12)
    variants = list(VARIANTS[:1] if args.quick else VARIANTS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop TorchServe
    reuse_freed_memory()  # the model's own time, as a worker computes it
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f}", flush=True)
    work = tempfile.mkdtemp(prefix="breakdown-")
    servers: list[Server] = []
    try:
        [spec] = make_models(work, ["example"])
        arrays = {p: np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) for p, shape in PAYLOADS.items()}
        bodies = {p: npy_bytes(a) for p, a in arrays.items()}
        servers = build_servers(work, spec, variants)
        for server in servers:
            start(server)
        encoder = encoder_for(spec, torch.get_num_threads())
        measurements, checks = [], {}
        for payload, body in bodies.items():
            expected = encoder.embed_requests([[arrays[payload]]])[0]
            for server in servers:
                for archive in server.archives:
                    name = NOOPS[archive][0] if archive in NOOPS else archive
                    measurements.append(served_row(server.ts, archive, name, payload, body, count))
                    first = measurements[-1].run()  # warm
                    if first.errors:
                        raise RuntimeError(f"{archive} {payload}: {first.errors[0]}")
                    if archive not in NOOPS:  # the answer checked
                        checks[f"{archive} {payload}"] = served_check(first.sample, expected, True)
            measurements.append(model_row(encoder, arrays[payload], payload, count))
            measurements.append(model_row(encoder, arrays[payload], payload, count, IDLE_S))
        run_rounds(measurements, rounds)
        rows = {(m.model, m.id): stats(m) for m in measurements}
        errors = [e for m in measurements for e in m.errors()]
        bad = {k: v for k, v in checks.items() if v is None or v > 1e-4}
        if bad:
            errors.append(f"served embeddings differ from in-process ones: {bad}")
        lines = table(rows, variants)
        print_table(lines)
        load_after = os.getloadavg()
        print("\nanswers vs in process (max abs diff): " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
        print(f"{os.cpu_count()} cores; {rounds} rounds of {count} requests per row; load average before "
              f"{load_before[0]:.2f}, after {load_after[0]:.2f}" + (f"\nERRORS: {errors}" if errors else ""))
        write_json(args.json, {"table": lines, "checks": checks, "errors": errors, "rounds": rounds,
                               "requests": count, "load_before": load_before, "load_after": load_after})
        return 1 if errors else 0
    finally:
        for server in servers:
            if server.ts is not None:
                server.ts.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
