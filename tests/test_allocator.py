"""The worker's malloc arena cap: glibc holds to it under threads that contend for the heap."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from image_embedder.allocator import limit_arenas
from image_embedder_testkit.checkout import REPO

# Eight threads allocate and free image-sized and small buffers at once, then glibc's malloc_info
# lists the heaps (arenas) the process has: one <heap nr="..."> per arena.
PROBE = r"""
import ctypes, ctypes.util, os, sys, tempfile, threading
sys.path.insert(0, os.path.join(sys.argv[1], "handler"))
from image_embedder.allocator import limit_arenas
print("LINE", limit_arenas(int(sys.argv[2])))
libc = ctypes.CDLL(ctypes.util.find_library("c"))
barrier = threading.Barrier(8)
def churn():
    barrier.wait()
    for i in range(2000):
        blocks = [bytearray(64 * (1 + i % 7)) for _ in range(50)] + [bytearray(200_000)]
        del blocks
threads = [threading.Thread(target=churn) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
libc.fdopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = libc.fclose.argtypes = None
with tempfile.TemporaryFile() as f:
    stream = ctypes.c_void_p(libc.fdopen(os.dup(f.fileno()), b"w"))
    libc.malloc_info(0, stream); libc.fclose(stream)
    f.seek(0); xml = f.read().decode()
print("HEAPS", xml.count("<heap nr="))
"""


def _probe(arena_max: int, env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, REPO, str(arena_max)], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    return lines["LINE"], int(lines["HEAPS"])


def _env_without_cap() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_cap_holds_under_contending_threads():
    line, heaps = _probe(2, _env_without_cap())
    assert line == "malloc arenas: at most 2 (malloc_arena_max)"
    assert 1 <= heaps <= 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_environment_wins_over_the_setting():
    line, heaps = _probe(4, {**_env_without_cap(), "MALLOC_ARENA_MAX": "1"})
    assert line == "malloc arenas: MALLOC_ARENA_MAX=1 from the environment"
    assert heaps == 1


def test_zero_leaves_glibc_alone(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_arenas(0) is None
