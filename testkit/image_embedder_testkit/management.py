"""TorchServe's management API as the tests, the load test and the bench use it: a model's workers
(their rows, their memory), scaling."""
from __future__ import annotations

import time
from typing import Optional

import requests

from .ts_server import TorchServe


def workers(server: TorchServe, model: str) -> list[dict]:
    """The management API's worker rows of `model` (id, pid, status, ...)."""
    r = requests.get(f"{server.management_url}/models/{model}", headers=server.headers("management"), timeout=30,
                     verify=server.verify)
    r.raise_for_status()
    return r.json()[0].get("workers", [])


def rss_mb(pid: int) -> Optional[float]:
    """A process's resident memory in MB; None when it is gone (or a restarting worker's pid -1)."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except (psutil.Error, ValueError):
        return None


def worker_rss_mb(server: TorchServe, model: str) -> list[float]:
    """Resident memory (MB) of each live worker process of `model`."""
    return [mb for mb in (rss_mb(int(w.get("pid") or -1)) for w in workers(server, model)) if mb is not None]


def scale(server: TorchServe, model: str, count: int, timeout: float = 180.0, synchronous: bool = True) -> float:
    """Scale `model` to exactly `count` workers and wait for them; returns the seconds it took.

    Synchronous: TorchServe answers 200 once the change is made, then `count` workers are READY.
    Else it may answer 202/206 ("in progress") at once, and the workers are polled until exactly
    `count` are left (a scale-down's stopping workers gone). RuntimeError on any other answer."""
    start = time.monotonic()

    def ask(wait: bool) -> requests.Response:
        params = {"min_worker": count, "max_worker": count, **({"synchronous": "true"} if wait else {})}
        return requests.put(f"{server.management_url}/models/{model}", params=params,
                            headers=server.headers("management"), timeout=timeout, verify=server.verify)

    r = ask(synchronous)
    if synchronous and r.status_code >= 500:
        # TorchServe 0.12 can fail a synchronous scale-down under load with its own NullPointerException
        # (a stopping worker's thread finds no job: "Job.isControlCmd() ... job is null"). Scaling is
        # idempotent: ask again without waiting, and wait for the workers here instead.
        r, synchronous = ask(False), False
    if r.status_code not in ((200,) if synchronous else (200, 202, 206)):
        raise RuntimeError(f"scaling {model} to {count} failed: {r.status_code} {r.text[:300]}")
    if synchronous:
        server.wait_for_workers(model, count, timeout=timeout)
    else:
        deadline = time.monotonic() + timeout
        while len(workers(server, model)) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} still has {workers(server, model)} after {timeout}s, not {count} workers")
            time.sleep(0.2)
        server.wait_for_workers(model, count, timeout=max(1.0, deadline - time.monotonic()))
    return time.monotonic() - start
