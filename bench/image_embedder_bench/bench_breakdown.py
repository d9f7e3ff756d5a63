"""Where the time of one request goes: the example model, batch-32 uint8 .npy, a plain requests client.

    .venv/bin/python scripts/bench_breakdown.py               # 20 requests, py-spy if installed
    .venv/bin/python scripts/bench_breakdown.py --overlap     # also: workers 1x2 vs 2x1, micro-batching, netty threads

Per request, from the outside in: what the client sees; TorchServe's access log (frontend, request
in to response out); the worker's PredictionTime (TorchServe's Python side, our handler inside) and
our own HandlerTime / ForwardTime metrics. With py-spy (`pip install py-spy==0.4.3`), the worker
process is sampled during the run, and its time is split into: waiting for the frontend, reading
and decoding the message (ts.protocol), our handler (decode / forward / encode) and sending the
answer. docs/performance.md reads these numbers.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import requests

from image_embedder_bench.bench_client import run_clients
from image_embedder_bench.cases import NPY, SHAPE, ModelSpec
from image_embedder_bench.json_out import write_json
from image_embedder_bench.measure import build_store, encoder_for, limit_runner, make_models
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_server import TorchServe
from image_embedder_tools.build import ArchiveSpec, build_archive

REPO_OUT = os.path.join(REPO, "out")
METRIC = re.compile(r"\[METRICS\](\w+)\.(?:Milliseconds|ms):([\d.]+)\|#ModelName:(\w+)")
ACCESS = re.compile(r'"POST /predictions/(\w+) HTTP/1.1" 200 (\d+)')
BACKEND = re.compile(r"Backend response time: (\d+)")
# py-spy stack frames (function names) that place a sample in one stage of the worker's loop
STAGES = [("our handler: forward", ("embed_requests",)), ("our handler: decode request", ("preprocess",)),
          ("our handler: encode response", ("postprocess",)), ("TorchServe: read + decode message", ("_retrieve_inference_msg",)),
          ("our handler: metrics", ("_record_metrics",)),
          ("TorchServe: build + send response", ("create_predict_response", "sendall")),
          ("TorchServe: around the handler", ("Service.predict",)),
          ("waiting for the frontend", ("retrieve_msg",))]


def worker_pids(server: TorchServe, model: str) -> list[int]:
    """The process ids of a model's workers, from the management API's describe answer."""
    r = requests.get(f"{server.management_url}/models/{model}", headers=server.headers("management"), timeout=10)
    return [int(w["pid"]) for w in r.json()[0].get("workers", []) if w.get("pid")]


def send(server: TorchServe, model: str, body: bytes, count: int, in_flight: int = 1) -> list[float]:
    """`count` requests per client from `in_flight` requests.Session clients; client-side latencies (ms)."""
    result = run_clients(server.inference_url, f"/predictions/{model}", body,
                         {**server.headers(), "Content-Type": NPY, "Accept": NPY}, in_flight, count, kind="requests")
    if result.errors:
        raise RuntimeError(result.errors[0])
    return [x * 1000 for x in result.latencies_s], count * in_flight * 32 / result.wall_s


def profile_stages(pid: int, seconds: float, out: str) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"),
                             "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--idle",
                             "--nonblocking", "--format", "raw", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stage_shares(raw_file: str) -> dict[str, float]:
    """Share of the worker's main-thread samples in each stage (collapsed stacks: 'f;g;h count')."""
    counts: collections.Counter = collections.Counter()
    with open(raw_file) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if "handle_connection" not in stack:  # other threads (metrics, decode pool)
                continue
            for stage, needles in STAGES:
                if any(f"{needle} (" in stack for needle in needles):
                    counts[stage] += int(n)
                    break
            else:
                counts["other"] += int(n)
    total = sum(counts.values()) or 1
    return {k: counts[k] / total for k, _ in STAGES + [("other", ())] if k in counts}


def log_metrics(workdir: str, model: str, skip: int) -> dict[str, float]:
    """Medians of the worker and frontend metrics for `model`, past the first `skip` (warm-up) requests."""
    values: dict[str, list[float]] = collections.defaultdict(list)
    for path in glob.glob(os.path.join(workdir, "logs", "*.log")):
        with open(path, errors="replace") as f:
            for line in f:
                for m in METRIC.finditer(line):
                    if m.group(3) == model:
                        values[m.group(1)].append(float(m.group(2)))
                if (a := ACCESS.search(line)) and a.group(1) == model:
                    values["access log (frontend)"].append(float(a.group(2)))
                if b := BACKEND.search(line):
                    values["Backend response time"].append(float(b.group(1)))
    # worker metrics are logged twice per batch (its stdout and the frontend's relay): keep distinct runs
    return {k: statistics.median(v[skip * (2 if len(v) > 1.5 * (skip + 1) else 1):] or v) for k, v in values.items()}


def breakdown(server: TorchServe, model: str, body: bytes, count: int) -> dict:
    warm = 3
    send(server, model, body, warm)
    pids = worker_pids(server, model)
    profile = None
    raw = os.path.join(tempfile.gettempdir(), f"pyspy-{os.getpid()}.txt")
    if pids and (shutil.which("py-spy") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "py-spy"))):
        profile = profile_stages(pids[0], 10, raw)
        time.sleep(1.0)  # py-spy attaches
    latencies, rate = send(server, model, body, count)
    out = {"client latency p50 ms": float(np.median(latencies)), "images/s": rate}
    if profile is not None:
        profile.wait(timeout=60)
        if os.path.exists(raw):
            out["worker stages (py-spy share of main-thread samples)"] = stage_shares(raw)
            shutil.move(raw, os.path.join(REPO_OUT, "pyspy-raw.txt")) if os.path.isdir(REPO_OUT) else os.remove(raw)
    return out


OVERLAP = [  # label, workers, torch threads per worker, TorchServe overrides
    ("1 worker x 2 threads", 1, 2, {}),
    ("2 workers x 1 thread", 2, 1, {}),
    ("1 worker x 1 thread", 1, 1, {}),
    ("1 worker x 2 threads, netty 4/4", 1, 2, {"number_of_netty_threads": 4, "netty_client_threads": 4}),
]


def overlap(work: str, spec: ModelSpec, body: bytes, count: int) -> list[dict]:
    """Images/s of one and two requests in flight for each worker layout (a fresh TorchServe each)."""
    rows = []
    for label, workers, threads, overrides in OVERLAP:
        store = os.path.join(work, f"store-{len(rows)}")
        os.makedirs(store)
        config = os.path.join(store, "cfg.yaml")
        with open(config, "w") as f:
            json.dump({"minWorkers": workers, "maxWorkers": workers, "batchSize": 1, "maxBatchDelay": 0,
                       "responseTimeout": 600}, f)
        build_archive(ArchiveSpec(spec.model_file, spec.model_class, spec.state_dict, spec.layer,
                                  input_shape=list(SHAPE), config_file=config, name="example",
                                  export_path=store, settings={"num_threads": threads}), quiet=True)
        server = TorchServe(store, "example=example.mar", overrides={"default_workers_per_model": workers, **overrides})
        try:
            server.start(timeout=300)
            server.wait_for_workers("example", workers, timeout=300)
            send(server, "example", body, 2, 2)
            row = {"layout": label}
            for in_flight in (1, 2, 4):
                row[f"{in_flight} in flight img/s"] = send(server, "example", body, max(2, count // in_flight), in_flight)[1]
            row["load average"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            server.cleanup()
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20, help="measured requests (after 3 warm-up)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="torch threads of the worker")
    parser.add_argument("--overlap", action="store_true", help="also compare worker layouts and netty threads")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="breakdown-")
    server = None
    results: dict = {"load_before": os.getloadavg()}
    try:
        [spec] = make_models(work, ["example"])
        body = npy_bytes(np.random.default_rng(0).integers(0, 256, (32, *SHAPE), dtype=np.uint8))
        names = build_store(work, [spec], ["single"], argparse.Namespace(threads=args.threads, max_batch_delay=0))
        server = TorchServe(os.path.join(work, "store"), ",".join(names), overrides={"default_workers_per_model": 1})
        server.start(timeout=300)
        server.wait_for_workers("example", 1, timeout=300)
        results["per request"] = breakdown(server, "example", body, args.requests)
        workdir = server.workdir
        server.stop(graceful=True)  # flushes the logs
        results["per request"].update(log_metrics(workdir, "example", 3))
        shutil.rmtree(workdir, ignore_errors=True)
        server = None
        limit = limit_runner(encoder_for(spec, args.threads),
                             np.random.default_rng(0).integers(0, 256, (32, *SHAPE), dtype=np.uint8), 5)()
        results["in-process limit ms per b32"] = 1000 * limit.wall_s / limit.requests
        if args.overlap:
            results["overlap"] = overlap(work, spec, body, args.requests)
        results["load_after"] = os.getloadavg()
        print(json.dumps(results, indent=1))
        write_json(args.json, results)
        return 0
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
