"""Malloc arenas and worker memory: the same mixed batches through the handler, with and without the cap.

    image-embedder bench-arenas --threads 8 --batches 3000

Each variant runs in its own process: the example archive (resize 256, center crop 224, scale) is
loaded in process as a TorchServe worker would load it, with `--threads` torch threads and as many
decode threads, i.e. the thread count of a worker on a machine with that many cores. Every batch
holds 8 requests in turn from the mix: 4 uint8 images as `.npy`, one 640x480 JPEG, 2 KB of garbage
(answered 400). Every `--sample` batches it records the process's RSS and its malloc arenas (glibc's
malloc_info lists one heap per arena). Variants: glibc's default arenas (8 per core) and the
handler's cap (`malloc_arena_max`, 2). A count of batches, not a time, so a busy machine changes the
duration, not the figures.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

from image_embedder_bench.json_out import write_json

VARIANTS = {"glibc default": {"MALLOC_ARENA_MAX": "0"}, "cap 2 (malloc_arena_max)": {}}


def malloc_heaps() -> int:
    """The arenas glibc's malloc has made in this process."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fdopen.restype = ctypes.c_void_p
    with tempfile.TemporaryFile() as f:
        stream = ctypes.c_void_p(libc.fdopen(os.dup(f.fileno()), b"w"))
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        f.seek(0)
        return f.read().decode().count("<heap nr=")


def run_variant(threads: int, batches: int, sample: int) -> None:
    """In this process: load the archive, run the batches, print one JSON line per sample."""
    import psutil

    from image_embedder_testkit.ts_inprocess import InProcessModel, Request

    from .soak import bodies, build_example

    store = tempfile.mkdtemp(prefix="arenas-")
    archive = build_example(store, {"num_threads": threads, "decode_threads": threads})
    model = InProcessModel(archive, batch_size=8)
    kinds = list(bodies().values())
    mix = [Request(body, content_type) for body, content_type, _ in kinds]
    expected = [status for _, _, status in kinds]
    process = psutil.Process()
    for n in range(1, batches + 1):
        batch = [mix[(n * 8 + i) % len(mix)] for i in range(8)]
        statuses = [r.status for r in model.predict(batch)]
        assert statuses == [expected[(n * 8 + i) % len(mix)] for i in range(8)], statuses
        if n % sample == 0 or n == 1:
            print(json.dumps({"batch": n, "rss_mb": round(process.memory_info().rss / 2**20, 1),
                              "arenas": malloc_heaps()}), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=8, help="torch and decode threads (a worker on this many cores)")
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--sample", type=int, default=100, help="record every this many batches")
    parser.add_argument("--json", help="write every variant's samples here")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.variant:
        run_variant(args.threads, args.batches, args.sample)
        return 0
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for name, env in VARIANTS.items():
        out = subprocess.run([sys.executable, "-m", "image_embedder_bench.arenas", "--variant", name,
                              "--threads", str(args.threads), "--batches", str(args.batches), "--sample", str(args.sample)],
                             env={**{k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}, **env},
                             capture_output=True, text=True, check=True)
        samples = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        results[name] = samples
        first, warm, last = samples[0], samples[len(samples) // 4], samples[-1]
        print(f"{name:26} arenas {last['arenas']:3}  RSS after batch 1 {first['rss_mb']:.0f} MB, after "
              f"{warm['batch']} {warm['rss_mb']:.0f} MB, after {last['batch']} {last['rss_mb']:.0f} MB", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
