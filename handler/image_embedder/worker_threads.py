"""torch threads per CPU worker that follow the live worker count, so workers x threads fits the cores.

TorchServe runs each worker as its own process, and scales them at run time (`PUT /models/<name>?min_worker=N`)
without telling the workers already running. So each worker leaves its pid in a folder shared by the
model's workers (the unpacked archive's folder, one per model) and, at most once per `interval` seconds
when it handles a batch, counts the pids there that are still alive and sets its threads to
cores // live workers. A killed worker's pid is dropped the first time it is found dead.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: Optional[int] = None) -> int:
    """torch threads for one of `workers` CPU workers: an equal share of the cores, at least one."""
    return max(1, (cores or available_cores()) // max(1, workers))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class WorkerThreads:
    """This worker's entry in the model's worker folder, and its thread count kept to its share."""

    def __init__(self, folder: str, interval: float = 1.0, cores: Optional[int] = None) -> None:
        self.folder = folder
        self.interval = interval
        self.cores = cores or available_cores()
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, str(os.getpid())), "w"):
            pass
        self._checked = float("-inf")
        self.workers = 1

    def live_workers(self) -> int:
        """The workers whose pid file is here and whose process is alive (this one included)."""
        count = 0
        for name in os.listdir(self.folder):
            if not name.isdigit():
                continue
            if _alive(int(name)):
                count += 1
            else:
                try:
                    os.remove(os.path.join(self.folder, name))
                except OSError:
                    pass
        return max(1, count)

    def refresh(self, now: Optional[float] = None) -> int:
        """Recount the live workers (at most once per interval) and set torch's threads to this worker's share."""
        now = time.monotonic() if now is None else now
        if now - self._checked >= self.interval:
            self._checked = now
            self.workers = self.live_workers()
            threads = threads_per_worker(self.workers, self.cores)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        return torch.get_num_threads()
