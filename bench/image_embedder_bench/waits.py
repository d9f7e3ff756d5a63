"""In process: how OpenMP's threads wait between ops (image_embedder/thread_wait.py). For each setting,
a process of its own times a lone ResNet-18 pass of 1 and of 8 images (median of many) and the CPU its
threads burn in the 300 ms after a pass, when another worker would want the cores; rounds interleave
the settings."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WAITS = {  # setting -> the environment torch loads with (None: unset)
    "GOMP_SPINCOUNT=10000 (the launchers')": {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None},
    "libgomp's default (300 000 spins)": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None},
    "OMP_WAIT_POLICY=PASSIVE": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"},
}

ABOUT = "in process: how torch's OpenMP threads wait between ops"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def child() -> None:
    """In a process of its own: lone ResNet-18 passes (ms, median) and the CPU ms burnt after one; JSON out."""
    import torch

    from runpy import run_path

    from image_embedder_testkit.checkout import RESNET_MODEL

    model = run_path(RESNET_MODEL)["ResNet18"]().eval()
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


def run(args: argparse.Namespace, work: str) -> dict:
    results: dict[str, list[dict]] = {name: [] for name in WAITS}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        for name, env in WAITS.items():
            child_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
            done = subprocess.run([sys.executable, "-c", "from image_embedder_bench.waits import child; child()"],
                                  env=child_env, capture_output=True, text=True, check=True, timeout=600)
            results[name].append(json.loads(done.stdout.splitlines()[-1]))
    print(f"\n{'how threads wait':40} {'b1 ms':>8} {'b8 ms':>8} {'CPU ms burnt in 300 ms after a pass':>36}")
    out = []
    for name, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        out.append({"setting": name, **med})
        print(f"{name:40} {med['b1_ms']:8.1f} {med['b8_ms']:8.1f} {med['cpu_ms_after_pass']:36.1f}")
    return {"rows": out, "errors": []}
