"""Torch threads in workers: how many after scaling, and how they wait between ops.

    .venv/bin/python scripts/bench_threads.py --workers 2 --seconds 6 --rounds 3
    .venv/bin/image-embedder bench-threads --wait --rounds 4

Default: N worker processes embedding at once, each with cores // N torch threads (a share that
follows the live worker count) or with every core (threads sized for a lone worker and kept after a
scale-up). Each worker is a process running the bench's ResNet-18-shaped model on batches of 8
3x224x224 images, as a TorchServe worker does; the median round's total images/s is printed.

--wait: how OpenMP's threads wait (image_embedder/thread_wait.py): for each setting, a process of its
own times a lone ResNet-18 pass of 1 and of 8 images (median of many) and the CPU its threads burn in
the 300 ms after a pass, when another worker would want the cores.

Rounds interleave the settings, so load from other processes hits all alike.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

WAITS = {  # setting -> the environment torch loads with (None: unset)
    "GOMP_SPINCOUNT=10000 (the launchers')": {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None},
    "libgomp's default (300 000 spins)": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None},
    "OMP_WAIT_POLICY=PASSIVE": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"},
}


def _worker(threads: int, seconds: float, start, out) -> None:
    import torch

    from image_embedder_bench import bench_models

    torch.set_num_threads(threads)
    model = bench_models.ResNet18().eval()
    batch = torch.rand(8, 3, 224, 224)
    with torch.inference_mode():
        model(batch)  # warm-up
        start.wait()
        images, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            model(batch)
            images += len(batch)
    out.put(images / (time.perf_counter() - begin))


def run(workers: int, threads: int, seconds: float) -> float:
    """Total images/s of `workers` processes with `threads` torch threads each."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, seconds, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def wait_child() -> None:
    """In a process of its own: lone ResNet-18 passes (ms, median) and the CPU ms burnt after one; JSON out."""
    import torch

    from image_embedder_bench import bench_models

    model = bench_models.ResNet18().eval()
    out = {}
    with torch.inference_mode():
        for batch, calls in ((1, 30), (8, 8)):
            x = torch.rand(batch, 3, 224, 224)
            model(x)
            model(x)  # warm-up
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - start) * 1000)
            out[f"b{batch}_ms"] = statistics.median(times)
        burnt = []
        for _ in range(3):
            model(x)
            cpu = time.process_time()
            time.sleep(0.3)  # idle, as a worker between requests: what do its threads take?
            burnt.append((time.process_time() - cpu) * 1000)
        out["cpu_ms_after_pass"] = statistics.median(burnt)
    print(json.dumps(out))


def wait_settings(rounds: int) -> int:
    results: dict[str, list[dict]] = {name: [] for name in WAITS}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        for name, env in WAITS.items():
            child_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
            done = subprocess.run([sys.executable, "-m", "image_embedder_bench.bench_threads", "--wait-child"],
                                  env=child_env, capture_output=True, text=True, check=True, timeout=600)
            results[name].append(json.loads(done.stdout.splitlines()[-1]))
    print(f"\n{'how threads wait':40} {'b1 ms':>8} {'b8 ms':>8} {'CPU ms burnt in 300 ms after a pass':>36}")
    for name, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        print(f"{name:40} {med['b1_ms']:8.1f} {med['b8_ms']:8.1f} {med['cpu_ms_after_pass']:36.1f}")
    print(f"medians of {rounds} rounds; load average after {os.getloadavg()[0]:.2f}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wait", action="store_true", help="compare how OpenMP's threads wait between ops")
    parser.add_argument("--wait-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.wait_child:
        wait_child()
        return 0
    print(f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    if args.wait:
        return wait_settings(args.rounds)
    cores = len(os.sched_getaffinity(0))
    settings = {"share (cores // workers)": max(1, cores // args.workers), "every core (sized for one worker)": cores}
    results: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, threads in settings.items():
            results[name].append(run(args.workers, threads, args.seconds))
    print(f"{args.workers} workers on {cores} cores, load average {os.getloadavg()[0]:.1f}")
    for name, threads in settings.items():
        rounds = ", ".join(f"{r:.1f}" for r in results[name])
        print(f"  {threads} threads each, {name}: median {statistics.median(results[name]):.1f} images/s ({rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
