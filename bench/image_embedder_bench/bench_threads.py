"""Threads after scaling: N worker processes embedding at once, each with cores // N torch threads (a
share that follows the live worker count) or with every core (threads sized for a lone worker and kept
after a scale-up).

    .venv/bin/python scripts/bench_threads.py --workers 2 --seconds 6 --rounds 3

Each worker is a process running the bench's ResNet-18-shaped model on batches of 8 3x224x224 images,
as a TorchServe worker does; the rounds interleave the two settings so load from other processes hits
both alike, and the median round's total images/s is printed for each.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Optional


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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
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
