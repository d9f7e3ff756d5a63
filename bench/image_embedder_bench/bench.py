"""Benchmarks: `image-embedder bench SUITE`, every suite measured one way, figures printed and as JSON.

    image-embedder bench layouts --plot out/layouts.png   # worker layouts side by side (~16 min on 2 cores)
    image-embedder bench layouts --quick                  # smoke run: example model, 1 round (what CI runs)
    image-embedder bench layouts --peer                   # also LitServe (pip install litserve==0.2.19)
    image-embedder bench payloads                         # .npy, JSON, float32, JPEG sizes, beside the no-op
    image-embedder bench fixed-cost --servings noop,noop-batched,shipped,passive
    image-embedder bench waits                            # in process: how torch's threads wait between ops
    image-embedder bench decode | options | gpu           # in process: JPEG paths, speed options, a GPU

Served suites (suites.py: layouts, payloads, fixed-cost) build their archives, serve them on private
TorchServes and divide every row by the engine in process on the same payload (limits.py). Every suite
runs in interleaved rounds, prints the load average before and after (a run that starts above 1.5
says its figures are not for the docs) and exits 1 on any error or wrong answer.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Optional

from .framework import QUIET_LOAD

IN_PROCESS = {"waits": "waits", "decode": "decode", "options": "options", "gpu": "gpu"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    from . import served, suites

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name in [*suites.SERVED, *IN_PROCESS]:
        module = None if name in suites.SERVED else importlib.import_module(f".{IN_PROCESS[name]}", __package__)
        p = sub.add_parser(name, help=suites.SERVED[name].about if module is None else module.ABOUT)
        p.add_argument("--quick", action="store_true", help="smoke run: the example model, 1 round, quick cases")
        p.add_argument("--models", help="comma-separated: example,resnet18 (default both; quick: example)")
        p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick: 1)")
        p.add_argument("--scale", type=int, default=1, help="multiplies every served row's requests")
        p.add_argument("--json", help="write every figure here")
        if name in suites.SERVED:
            served.add_arguments(p, suites.SERVED[name])
        else:
            module.add_arguments(p)
    args = parser.parse_args(argv)
    args.models = (args.models or ("example" if args.quick else "example,resnet18")).split(",")
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    from . import served, suites

    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    print(f"load average {load_before:.2f}" + ("" if load_before < QUIET_LOAD else
          f": above {QUIET_LOAD}, the machine is not quiet; figures from this run are not for the docs"), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop the servers
    work = tempfile.mkdtemp(prefix=f"bench-{args.suite}-")
    start = time.perf_counter()
    try:
        if args.suite in suites.SERVED:
            results = served.run(suites.SERVED[args.suite], args, work)
            if args.suite == "fixed-cost":
                results["ours"] = suites.ours(results)
        else:
            results = importlib.import_module(f".{IN_PROCESS[args.suite]}", __package__).run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    quiet = load_before < QUIET_LOAD
    results.update(suite=args.suite, load_before=load_before, load_after=load_after, quiet=quiet,
                   wall_s=time.perf_counter() - start)
    print(f"\n{args.suite} finished in {results['wall_s']:.0f}s; load average before {load_before:.2f}, after "
          f"{load_after:.2f}: {'quiet' if quiet else f'NOT QUIET (above {QUIET_LOAD}): not for the docs'}")
    for error in results["errors"]:
        print(f"ERROR: {error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if getattr(args, "plot", None):
        from .plot import plot_layouts

        plot_layouts(results, args.plot)
        print(f"chart: {args.plot}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
