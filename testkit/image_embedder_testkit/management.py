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


def scale(server: TorchServe, model: str, count: int, timeout: float = 180.0) -> float:
    """Scale `model` to exactly `count` workers, synchronously, and wait for them to be READY;
    returns the seconds it took. RuntimeError when TorchServe does not answer 200."""
    start = time.monotonic()
    r = requests.put(f"{server.management_url}/models/{model}",
                     params={"min_worker": count, "max_worker": count, "synchronous": "true"},
                     headers=server.headers("management"), timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"scaling {model} to {count} failed: {r.status_code} {r.text[:300]}")
    server.wait_for_workers(model, count, timeout=timeout)
    return time.monotonic() - start
