"""TorchServe's management API as the tests and the load test use it: list and scale a model's workers."""
from __future__ import annotations

import time

import requests

from .ts_server import TorchServe


def workers(server: TorchServe, model: str) -> list[dict]:
    """The management API's worker rows of `model` (id, pid, status, ...)."""
    r = requests.get(f"{server.management_url}/models/{model}", headers=server.headers("management"), timeout=30)
    r.raise_for_status()
    return r.json()[0].get("workers", [])


def scale(server: TorchServe, model: str, count: int, timeout: float = 180.0, synchronous: bool = True) -> float:
    """Scale `model` to exactly `count` workers and wait for them; returns the seconds it took.

    Synchronous: TorchServe answers 200 once the change is made, then `count` workers are READY.
    Else it may answer 202/206 ("in progress") at once, and the workers are polled until exactly
    `count` are left (a scale-down's stopping workers gone). RuntimeError on any other answer."""
    start = time.monotonic()
    params = {"min_worker": count, "max_worker": count, **({"synchronous": "true"} if synchronous else {})}
    r = requests.put(f"{server.management_url}/models/{model}", params=params,
                     headers=server.headers("management"), timeout=timeout)
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
    return time.monotonic() - start
