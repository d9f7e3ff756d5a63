"""glibc malloc's arena limit for a worker process.

A worker allocates image-sized buffers (decoded pixels, batches, activations) from its decode
threads and torch's threads. glibc gives each thread that contends for the heap an arena of its
own, up to 8 per core, and memory freed in one arena is reused only within it, so the arenas a
worker keeps grow with the node's cores. Capping them bounds that on many-core nodes; on 2 cores
the soak measured no difference (docs/reliability.md#memory-over-hours, where the growth it was
looking for turned out to be reference cycles). `MALLOC_ARENA_MAX` in the environment does the same
from the process's start and wins over the setting.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

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
    return libc
