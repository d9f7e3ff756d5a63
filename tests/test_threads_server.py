"""Threads after scaling, on a real TorchServe: each worker's torch threads follow the live worker count
(`PUT /models/encoder?min_worker=2`, then back to 1), as each worker reports in its describe answer."""
from __future__ import annotations

import os
import time

import pytest
import requests

from image_embedder_testkit.ts_server import TorchServe

pytestmark = pytest.mark.server


def describe(server) -> dict:
    r = requests.get(f"{server.inference_url}/predictions/encoder", headers=server.headers(describe="true"), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["worker"]


def scale(server, workers: int) -> None:
    r = requests.put(f"{server.management_url}/models/encoder?min_worker={workers}&max_worker={workers}&synchronous=true",
                     headers=server.headers("management"), timeout=120)
    assert r.status_code == 200, r.text


def poll_workers(server, workers: int, timeout: float = 120.0) -> dict[int, dict]:
    """Describe answers until `workers` distinct worker pids each report `workers` live workers."""
    seen: dict[int, dict] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        answer = describe(server)
        if answer["live_workers"] == workers:
            seen[answer["pid"]] = answer
            if len(seen) == workers:
                return seen
        else:
            seen.pop(answer["pid"], None)
        time.sleep(0.05)  # poll interval, not a wait for state
    raise AssertionError(f"not every one of {workers} workers saw {workers} live workers within {timeout}s: {seen}")


def test_threads_follow_scaling(model_store, example_archive):
    cores = len(os.sched_getaffinity(0))
    with TorchServe(model_store, "encoder=encoder.mar") as server:
        server.wait_for_workers("encoder")
        [alone] = poll_workers(server, 1).values()
        assert alone["torch_threads"] == cores  # one worker uses every core
        scale(server, 2)
        server.wait_for_workers("encoder", 2)
        pair = poll_workers(server, 2)
        # two workers share the cores: together they never ask for more threads than there are cores
        assert all(w["torch_threads"] * 2 <= max(cores, 2) and w["torch_threads"] >= 1 for w in pair.values()), pair
        assert len({w["torch_threads"] for w in pair.values()}) == 1, pair
        scale(server, 1)
        [survivor] = poll_workers(server, 1).values()
        assert survivor["pid"] in pair and survivor["torch_threads"] == cores  # the cores come back
