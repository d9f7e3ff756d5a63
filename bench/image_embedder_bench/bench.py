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

What runs is cases.py (archives, payloads, cases, targets: data with ids), how it is timed is
measure.py, what is printed is report.py; this module is the run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Optional

import torch

from image_embedder_bench.cases import PAYLOADS, make_payloads, select_cases
from image_embedder_bench.json_out import write_json
from image_embedder_bench.measure import (Measurement, build_store, decode_rows, draft_accuracy, encoder_for,
                                          floor_rows, handler_breakdown, in_process_rows, make_models, option_report,
                                          run_rounds, served_rows, wait_for_archives)
from image_embedder_bench.report import report
from image_embedder_testkit.ts_server import TorchServe


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
        cases = select_cases(payloads, args.quick, args.payloads)
        archives = sorted({c.archive for c in cases})
        models = build_store(work, specs, archives, args)
        print(f"{len(models)} archives built in {time.perf_counter() - t_start:.1f}s", flush=True)
        server = TorchServe(os.path.join(work, "store"), ",".join(models), overrides={"default_workers_per_model": 1})
        server.start(timeout=300)
        wait_for_archives(server, specs, models)
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
        write_json(args.json, results)
        return 1 if results["errors"] else 0
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
