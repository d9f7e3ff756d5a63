"""torch threads per CPU worker, from the workers computing right now: a lone request gets every core.

TorchServe runs each worker as its own process and tells none of them what the others are doing. So
every worker of every model that one TorchServe serves (they share its temporary folder) holds a slot
in one small shared file: its pid and whether it is computing. Before each forward pass a worker marks
itself busy, counts the busy workers and takes its share of the cores (cores // busy, the remainder to
the lowest slots); when its batch is answered it marks itself idle. Alone it uses every core; N busy at
once use about cores / N each, so threads x busy workers stays within the cores, and a batch that
started alone narrows at its next pass when another worker starts (and widens when it stops).
A worker killed while busy is dropped the first time another finds its pid dead.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import tempfile
from typing import Iterator, Optional

import numpy as np
import torch

SLOTS = 1024  # workers per TorchServe: pid and busy flag, two int32 each (8 KiB)


CPU_QUOTA_FILES = ("/sys/fs/cgroup/cpu.max",  # cgroup v2: "<quota> <period>" or "max <period>"
                   "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1, beside cpu.cfs_period_us


def cpu_quota(files: tuple = CPU_QUOTA_FILES) -> Optional[int]:
    """The whole CPUs a container's CPU limit allows (quota / period, at least 1), or None when unlimited.

    A pod limited to 2 CPUs may still see every core of its node in its affinity; threads sized
    from the affinity would then be throttled by the limit."""
    for path in files:
        try:
            with open(path) as f:
                fields = f.read().split()
            if path.endswith("cpu.cfs_quota_us"):
                with open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us")) as f:
                    fields.append(f.read().strip())
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        quota, period = int(fields[0]), int(fields[1])
        return max(1, quota // period) if quota > 0 and period > 0 else None
    return None


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its container's CPU limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return min(cores, quota) if quota else cores


def default_share_file() -> str:
    """One file per TorchServe: its workers all unpack models under the same temporary folder."""
    return os.path.join(tempfile.gettempdir(), f"image-embedder-busy-workers-{os.getuid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def share_of(cores: int, busy: int, rank: int) -> int:
    """Threads for the worker of this rank among `busy` computing workers: an even split of the cores,
    the remainder to the lowest ranks, and never less than one."""
    base, extra = divmod(cores, max(1, busy))
    return max(1, base + (rank < extra))


class CoreShare:
    """This worker's slot in the shared file, and its torch threads kept to its share of the cores."""

    def __init__(self, path: Optional[str] = None, cores: Optional[int] = None, pid: Optional[int] = None) -> None:
        self.path = path or default_share_file()
        self.cores = cores or available_cores()
        self.pid = pid or os.getpid()
        self.busy_workers = 0
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # claiming a slot is the only write two workers could race on
            if os.fstat(fd).st_size < SLOTS * 8:
                os.ftruncate(fd, SLOTS * 8)
            self._map = mmap.mmap(fd, SLOTS * 8)
            self._table = np.frombuffer(self._map, dtype=np.int32).reshape(SLOTS, 2)  # (pid, busy) per slot
            self.slot = self._claim()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _claim(self) -> int:
        for slot, (pid, _) in enumerate(self._table):
            if pid in (0, self.pid) or not _alive(int(pid)):
                self._table[slot] = (self.pid, 0)
                return slot
        raise OSError(f"all {SLOTS} worker slots of {self.path} belong to live processes")

    def live_workers(self) -> int:
        """How many workers of this TorchServe are alive (this one included), computing or not."""
        return sum(1 for pid, _ in self._table if pid and (pid == self.pid or _alive(int(pid))))

    def refresh(self) -> int:
        """Before a forward pass of a busy worker: count the busy workers (dropping dead ones) and set
        torch's threads to this worker's share of the cores now."""
        ranked = []
        for slot in np.flatnonzero(self._table[:, 1]):
            if slot == self.slot or _alive(int(self._table[slot, 0])):
                ranked.append(int(slot))
            else:  # killed while computing
                self._table[slot, 1] = 0
        if self.slot not in ranked:  # called outside `busy`: count this worker as about to compute
            ranked = sorted([*ranked, self.slot])
        self.busy_workers = len(ranked)
        threads = share_of(self.cores, len(ranked), ranked.index(self.slot))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    @contextlib.contextmanager
    def busy(self) -> Iterator[int]:
        """Computing from here to the end of the block: yields this worker's threads at the start."""
        self._table[self.slot, 1] = 1
        try:
            yield self.refresh()
        finally:
            self._table[self.slot, 1] = 0

