"""Threads on a real TorchServe, as workers become busy and idle, scale up and down, and die: a model
whose embedding is the thread count of its own forward pass (tests/models/thread_probe.py) answers
with what each worker got, and holds a pass open on request, so several workers compute at the same
moment by construction. Nothing is timed: the test waits on files the held passes leave."""
from __future__ import annotations

import glob
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests
import yaml

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import TEST_MODELS
from image_embedder_testkit.management import scale
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import ArchiveSpec, build_archive

pytestmark = pytest.mark.server
CORES = len(os.sched_getaffinity(0))  # the workers inherit the test's cores


class Probe:
    """Requests to the probe model: free passes answer at once, held ones wait for `release`."""

    def __init__(self, server: TorchServe, gate: str) -> None:
        self.server, self.gate = server, gate
        self.held: list[tuple[threading.Thread, dict]] = []

    def post(self, held: bool = False) -> requests.Response:
        image = np.full((1, 3, 4, 4), 1.0 if held else 0.0, np.float32)
        return requests.post(f"{self.server.inference_url}/predictions/probe", data=npy_bytes(image), timeout=300,
                             headers=self.server.headers(**{"Content-Type": "application/x-npy"}))

    def threads(self) -> float:
        """The torch threads of one free pass."""
        r = self.post()
        assert r.status_code == 200, r.text
        [[threads]] = r.json()["embeddings"]
        return threads

    def entered(self) -> list[str]:
        return glob.glob(os.path.join(self.gate, "entered-*"))

    def hold(self) -> None:
        """One more worker computing (its pass held open), once it has really started."""
        count = len(self.entered()) + 1
        answer: dict = {}
        thread = threading.Thread(target=lambda: answer.setdefault("response", self.post(held=True)), daemon=True)
        thread.start()
        self.held.append((thread, answer))
        deadline = time.monotonic() + 120
        while len(self.entered()) < count:
            assert thread.is_alive() and time.monotonic() < deadline, "the held request did not start its pass"
            time.sleep(0.01)  # poll interval

    def release(self) -> list[requests.Response]:
        """Let every held pass finish; their answers."""
        for path in self.entered():
            os.remove(path)
        for thread, _ in self.held:
            thread.join(timeout=300)
        answers = [answer["response"] for _, answer in self.held]
        self.held.clear()
        return answers


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    store, gate = tmp_path_factory.mktemp("probe_store"), tmp_path_factory.mktemp("gate")
    config = store / "model-config.yaml"  # every request its own batch: one held request holds one worker
    config.write_text(yaml.safe_dump({"minWorkers": 2, "maxWorkers": 2, "batchSize": 1, "maxBatchDelay": 1}))
    build_archive(ArchiveSpec(os.path.join(TEST_MODELS, "thread_probe.py"), "ThreadProbe", None, "probe",
                              model_kwargs={"gate": str(gate)}, name="probe", export_path=str(store),
                              config_file=str(config)), quiet=True)
    server = TorchServe(str(store), "probe=probe.mar").serve("probe", workers=2, timeout=240)
    yield Probe(server, str(gate))
    server.cleanup()


def test_a_lone_request_gets_every_core_and_concurrent_ones_share(probe):
    assert probe.threads() == CORES  # one worker computing: every core
    probe.hold()  # worker 1 computing
    shared = probe.threads()  # worker 2 computes beside it
    assert 1 <= shared <= math.ceil(CORES / 2) and (shared < CORES or CORES == 1)
    [held] = probe.release()
    assert held.status_code == 200 and held.json()["embeddings"] == [[CORES]]  # the held pass started alone
    assert probe.threads() == CORES  # worker 1 idle again: every core back


def test_threads_follow_scaling_up_and_down(probe):
    scale(probe.server, "probe", 3)
    probe.hold()
    probe.hold()
    third = probe.threads()
    assert 1 <= third <= math.ceil(CORES / 3)
    assert [r.status_code for r in probe.release()] == [200, 200]
    assert probe.threads() == CORES
    scale(probe.server, "probe", 1)
    assert probe.threads() == CORES
    scale(probe.server, "probe", 2)


def test_a_worker_killed_mid_pass_stops_counting(probe):
    probe.hold()
    [entered] = probe.entered()
    os.kill(int(entered.rsplit("-", 1)[1]), signal.SIGKILL)  # dies busy: its flag is never cleared
    [killed] = probe.release()
    assert killed.status_code >= 500  # TorchServe's "Worker died."
    probe.server.wait_for_workers("probe", 2)  # TorchServe restarts it
    assert probe.threads() == CORES  # the dead worker no longer counts as computing
