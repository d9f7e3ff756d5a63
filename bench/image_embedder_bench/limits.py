"""What serving could reach if serving cost nothing: the engine in this process on the worker's exact
work, with the best pass size of 8/16/32 (measured anew each round).

- `single stream`: this process with every thread, one request after another (a user's own loop): the
  bar for one sequential client; its latencies are the model's time per request;
- `single stream after idle`: the same, each call after a pause as long as a served round trip (threads
  asleep, caches cold: what a lone served request finds);
- `team`: one single-thread process per core side by side, summed; the best layout is the better of
  the two: the bar for concurrent clients, whatever layout the server picks.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from typing import Callable

from image_embedder.allocator import reuse_freed_memory

from .bench_client import RunResult
from .framework import Engine, Images, cores

PASS_SIZES = (8, 16, 32)
IDLE_S = 0.01  # the pause before each call of the after-idle limit: about a served request's round trip


def timed(fn: Callable[[], object], calls: int, idle_s: float = 0.0) -> RunResult:
    """`calls` calls of `fn`, each after `idle_s` asleep (not counted in the wall time or latencies)."""
    latencies = []
    for _ in range(calls):
        if idle_s:
            time.sleep(idle_s)
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    return RunResult(calls, sum(latencies), latencies)


def sizes_for(count: int) -> list[int]:
    return [p for p in PASS_SIZES if p <= count] or [count]


def single_stream(engine: Engine, images: Images, calls: int, idle_s: float = 0.0) -> Callable[[], RunResult]:
    """A round of the single-stream limit: the fastest pass size's calls."""
    reuse_freed_memory()  # as a worker computes
    encoder, work = engine.work(cores(), images)
    for size in sizes_for(len(images)):  # warm-up
        encoder.pass_size = size
        work()

    def run() -> RunResult:
        results = []
        for size in sizes_for(len(images)):
            encoder.pass_size = size
            results.append(timed(work, calls, idle_s))
        return min(results, key=lambda r: r.wall_s / r.requests)

    return run


def _team_member(engine: Engine, images: Images, calls: int, start, out) -> None:
    reuse_freed_memory()
    encoder, work = engine.work(1, images)
    best = {}
    for size in sizes_for(len(images)):  # this process's best pass size
        encoder.pass_size = size
        work()
        best[size] = timed(work, 1).wall_s
    encoder.pass_size = min(best, key=best.get)
    start.wait()  # all members start together: side by side, not one after another
    out.put(len(images) * calls / timed(work, calls).wall_s)


def team(engine: Engine, images: Images, calls: int) -> Callable[[], RunResult]:
    """A round of the team limit: summed images/s, as one 'request' of all the images (no latencies)."""
    def run() -> RunResult:
        ctx = mp.get_context("spawn")
        start, out = ctx.Barrier(cores()), ctx.Queue()
        procs = [ctx.Process(target=_team_member, args=(engine, images, calls, start, out), daemon=True)
                 for _ in range(cores())]
        for p in procs:
            p.start()
        try:
            rate = sum(out.get(timeout=1800) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=60)
        return RunResult(1, len(images) / rate, [])

    return run
