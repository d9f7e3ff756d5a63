"""glibc malloc settings for a worker process: freed request buffers stay for the next request.

A request's buffers (the decoded batch, activations, the embeddings) are megabytes each. glibc
serves a block above its mmap threshold with a fresh mmap and unmaps it when freed, and returns the
top of its heap to the system once more than the trim threshold is free there; both thresholds start
small and only grow as it sees such blocks freed. Either way the next request touches new pages:
thousands of minor page faults per batch of 32 images (docs/performance.md#the-fixed-cost-of-a-request).
Pinning the mmap threshold at glibc's largest (32 MiB, half a heap) and the trim threshold at 1 GiB
keeps those pages, so memory stays at the peak a request reaches, as it would under load. The trim
threshold must exceed what one request frees at the top of the heap: at twice the mmap threshold
(glibc's own ratio) a ResNet-18 batch of 32 still took 17 000-56 000 page faults and a fifth longer.

The environment wins: `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` set by the operator are
left as they are. Elsewhere than glibc (musl) nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

# mallopt's parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 1024 * 1024 * 1024  # mallopt takes an int
THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def reuse_freed_memory(enabled: bool = True) -> Optional[str]:
    """Pin glibc's mmap and trim thresholds so that freed buffers of up to 32 MiB are reused; say what
    holds, or None where there is nothing to do (disabled, or not glibc)."""
    from_env = [f"{name}={os.environ[name]}" for name in THRESHOLD_VARIABLES if name in os.environ]
    if from_env:
        return f"malloc thresholds: {' '.join(from_env)} from the environment"
    if not enabled:
        return None
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 \
            or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return None
    return (f"malloc thresholds: mmap {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB "
            "(reuse_freed_memory)")


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
