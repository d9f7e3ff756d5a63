"""glibc malloc's arena limit for a worker process.

A worker allocates image-sized buffers (decoded pixels, batches, activations) from its decode
threads and torch's threads. glibc gives each thread that contends for the heap an arena of its
own, up to 8 per core, and memory freed in one arena is not reused by another: under a mix of
request kinds a worker's resident memory creeps up as each arena keeps its own high-water mark
(docs/reliability.md shows the soak). Capping the arenas bounds it; `MALLOC_ARENA_MAX` in the
environment does the same from the process's start and wins over the setting.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from typing import Callable, Optional

M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(arena_max: int) -> Optional[str]:
    """Cap glibc's malloc arenas at `arena_max` (0 leaves glibc's default); say what holds, or None.

    Returns a line for the worker's log: the environment's value when `MALLOC_ARENA_MAX` is set
    (the operator's choice wins), the applied cap, or None where there is nothing to do (0, or a
    libc that is not glibc, such as musl)."""
    from_env = os.environ.get("MALLOC_ARENA_MAX")
    if from_env is not None:
        return f"malloc arenas: MALLOC_ARENA_MAX={from_env} from the environment"
    if arena_max == 0:
        return None
    libc = _glibc()
    if libc is None or libc.mallopt(M_ARENA_MAX, arena_max) != 1:
        return None
    return f"malloc arenas: at most {arena_max} (malloc_arena_max)"


class Trimmer:
    """Hands free heap pages back to the OS (glibc's malloc_trim) at most every `interval_s` seconds.

    Freed memory inside an arena stays resident until trimmed; a worker calls `after_batch` once
    its batch is answered. 0 turns it off, as does a libc that is not glibc."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock = interval_s, clock
        self._libc = _glibc() if interval_s > 0 else None
        self._last = clock()
        self.trims = 0

    def after_batch(self) -> bool:
        """Trim if the interval has passed since the last trim; says whether it did."""
        if self._libc is None or self.clock() - self._last < self.interval_s:
            return False
        self._libc.malloc_trim(0)
        self._last = self.clock()
        self.trims += 1
        return True


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library if it is glibc (it has mallopt and gnu_get_libc_version)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc
