"""Rolling out version 2.0 of `encoder` over 1.0 on a real TorchServe while clients keep sending.

Two archives of one model name, built with `--version 1.0` and `--version 2.0` from one model file
with different weights, so every answer tells which version computed it (each is compared with its
own reference, image_embedder_testkit.reference). Two threads send through one EmbeddingClient (it
sends a batch lost with a stopped worker again) the whole time:
- shipped config (model API off): both versions loaded at start; `PUT /models/encoder/2.0/set-default`;
  1.0 retired by scaling it to 0 workers; its DELETE refused;
- model API on: 2.0 registered at run time, set-default, `DELETE /models/encoder/1.0`.
Both: no request lost; every answer is the reference of one version; answers finished before the
switch was asked are 1.0's and requests sent after set-default returned get 2.0's.

1.0 is retired once its queue is empty (`jobQueueStatus.pendingRequests` of `GET /models/encoder/1.0`),
as docs/usage.md says to: TorchServe 0.12 keeps jobs queued for a version whose last worker stops,
with no worker left to answer them (the client would send them again only after its timeout). A batch
a stopping worker holds is failed with "Worker scaled down." and the client sends it again.
"""
from __future__ import annotations

import shutil
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import requests
import torch

from image_embedder_client import EmbeddingClient
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.management import scale
from image_embedder_testkit.reference import load_reference_model, reference_embeddings
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import ArchiveSpec, build_archive

VERSIONS = ("1.0", "2.0")
ONE_WORKER = {"default_workers_per_model": 1}  # per version: the machine may have 2 cores
ANSWERS_PER_PHASE = 20  # requests answered before moving to the next step, so each step meets load
CLIENT_TIMEOUT_S = 60.0

TINY = textwrap.dedent('''
    import torch.nn as nn


    class Tiny(nn.Module):
        """One convolution: its weights are all that tells two versions apart."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv1(x)
''')


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict:
    """encoder-1.0.mar and encoder-2.0.mar (model name `encoder`) in one store, the images the clients
    send, and each version's reference embeddings of them."""
    folder = tmp_path_factory.mktemp("versions")
    store = tmp_path_factory.mktemp("versions_store")
    model_file = folder / "tiny.py"
    model_file.write_text(TINY)
    images = [im for im in np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)]
    references = {}
    for seed, version in enumerate(VERSIONS):
        torch.manual_seed(seed)
        weights = folder / f"tiny-{version}.pth"
        torch.save(load_reference_model(str(model_file), "Tiny").state_dict(), weights)
        mar = build_archive(ArchiveSpec(str(model_file), "Tiny", str(weights), "conv1", version=version,
                                        export_path=str(folder / version)), quiet=True)
        shutil.copy(mar, store / f"encoder-{version}.mar")
        model = load_reference_model(str(model_file), "Tiny", str(weights))
        references[version] = [reference_embeddings(model, "conv1", im) for im in images]
    for one, two in zip(references["1.0"], references["2.0"]):
        assert not np.allclose(one, two, atol=1e-3), "the two versions must be told apart by their answers"
    return {"store": str(store), "images": images, "references": references}


@dataclass(frozen=True)
class Answer:
    """One request of the traffic: which image, when, and the embedding (None: the client gave up)."""

    image: int
    sent: float
    done: float
    rows: Optional[np.ndarray]
    error: str = ""


class Traffic:
    """`threads` threads embedding `images`, one per request, round and round until `stop()`."""

    def __init__(self, client: EmbeddingClient, images: list[np.ndarray], threads: int = 2) -> None:
        self.client, self.images = client, images
        self.answers: list[Answer] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(k,), daemon=True) for k in range(threads)]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send(self, first: int) -> None:
        index = first
        while not self._stop.is_set():
            image = index % len(self.images)
            sent = time.monotonic()
            try:
                rows, error = self.client.embed(self.images[image]), ""
            except Exception as exc:  # anything but an embedding is a lost request
                rows, error = None, f"{type(exc).__name__}: {exc}"
            with self._changed:
                self.answers.append(Answer(image, sent, time.monotonic(), rows, error))
                self._changed.notify_all()
            index += 1

    def wait_for_answers(self, sent_after: float, count: int = ANSWERS_PER_PHASE, timeout: float = 120.0) -> None:
        """Block until `count` requests sent after `sent_after` (monotonic) have come back."""
        with self._changed:
            if not self._changed.wait_for(lambda: sum(a.sent > sent_after for a in self.answers) >= count, timeout):
                raise TimeoutError(f"fewer than {count} answers within {timeout} s: {self.answers[-3:]}")

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S * 3)
            assert not thread.is_alive(), "a client thread still waits for its answer"
        return self.answers


def version_of(answer: Answer, references: dict) -> Optional[str]:
    """The version whose reference embedding of the image this answer is, or None."""
    for version, expected in references.items():
        want = expected[answer.image]
        if answer.rows is not None and answer.rows.shape == want.shape and np.allclose(answer.rows, want, atol=1e-5):
            return version
    return None


def check_rollout(answers: list[Answer], references: dict, switch_asked: float, switched: float,
                  retired: float) -> None:
    """Nothing lost or wrong; 1.0 before the switch, 2.0 for every request sent after it returned."""
    by = [(a, version_of(a, references)) for a in answers]
    lost = [a.error for a in answers if a.rows is None]
    summary = f"{len(answers)} answers; lost: {lost[:5]}; not one version's: {[a for a, v in by if v is None][:5]}"
    assert not lost, summary  # zero lost requests
    assert all(v is not None for _, v in by), summary
    assert {v for a, v in by if a.done < switch_asked} == {"1.0"}, summary
    assert {v for a, v in by if a.sent > switched} == {"2.0"}, summary
    assert sum(a.sent > retired for a, _ in by) >= ANSWERS_PER_PHASE, summary  # served on after retiring
    print(f"{len(answers)} answers: {sum(v == '1.0' for _, v in by)} by 1.0, {sum(v == '2.0' for _, v in by)} by 2.0")


def manage(server: TorchServe, method: str, path: str, **params: object) -> requests.Response:
    return requests.request(method, f"{server.management_url}{path}", params=params,
                            headers=server.headers("management"), timeout=120)


def predict(server: TorchServe, path: str, image: np.ndarray) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{path}", data=npy_bytes(image),
                         headers=server.headers(**{"Content-Type": "application/x-npy"}), timeout=60)


def served_versions(server: TorchServe) -> list[str]:
    r = manage(server, "GET", "/models/encoder/all")
    r.raise_for_status()
    return sorted(m["modelVersion"] for m in r.json())


def wait_until_drained(server: TorchServe, model: str, timeout: float = 60.0) -> None:
    """Poll until no request waits in `model`'s queue (TorchServe's jobQueueStatus.pendingRequests)."""
    deadline = time.monotonic() + timeout
    while True:
        r = manage(server, "GET", f"/models/{model}")
        r.raise_for_status()
        if r.json()[0]["jobQueueStatus"]["pendingRequests"] == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model} still has queued requests after {timeout} s: {r.text[:300]}")
        time.sleep(0.05)


def set_default(server: TorchServe, version: str) -> None:
    r = manage(server, "PUT", f"/models/encoder/{version}/set-default")
    assert r.status_code == 200, r.text


def assert_answers(server: TorchServe, path: str, version: str, versions: dict) -> None:
    """`/predictions/<path>` answers `version`'s embeddings and describes itself as `version`."""
    image = versions["images"][0]
    r = predict(server, path, image)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32), versions["references"][version][0],
                               atol=1e-5)
    described = requests.get(f"{server.inference_url}/predictions/{path}", timeout=60,
                             headers=server.headers(describe="true"))
    assert described.status_code == 200 and described.json()["model_version"] == version, described.text


@pytest.fixture
def start_server(versions):
    """Starts a TorchServe on the versions' store (config overrides, models at start); stopped after the test."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17")
    started = []

    def start(models: str, **overrides: object) -> TorchServe:
        server = TorchServe(versions["store"], models, overrides={**ONE_WORKER, **overrides})
        started.append(server)
        return server.start(timeout=240)

    yield start
    for server in started:
        server.cleanup()


@pytest.mark.server
def test_shipped_config_serves_both_versions_switches_and_retires_1_0_under_load(versions, start_server):
    server = start_server("encoder=encoder-1.0.mar,encoder=encoder-2.0.mar")
    for version in VERSIONS:
        server.wait_for_workers(f"encoder/{version}")
    assert served_versions(server) == ["1.0", "2.0"]
    assert_answers(server, "encoder", "1.0", versions)  # the first listed at start is the default
    assert_answers(server, "encoder/1.0", "1.0", versions)
    assert_answers(server, "encoder/2.0", "2.0", versions)
    # the model API is off: unregistering is refused, and 1.0 stays
    r = manage(server, "DELETE", "/models/encoder/1.0")
    assert r.status_code == 405, (r.status_code, r.text)
    assert served_versions(server) == ["1.0", "2.0"]

    client = EmbeddingClient(server.inference_url, "encoder", token=server.keys["inference"], timeout=CLIENT_TIMEOUT_S)
    with client, Traffic(client, versions["images"]) as traffic:
        traffic.wait_for_answers(sent_after=0.0)
        switch_asked = time.monotonic()
        set_default(server, "2.0")
        switched = time.monotonic()
        traffic.wait_for_answers(sent_after=switched)
        wait_until_drained(server, "encoder/1.0")
        scale(server, "encoder/1.0", 0)
        retired = time.monotonic()
        traffic.wait_for_answers(sent_after=retired)
        answers = traffic.stop()
    check_rollout(answers, versions["references"], switch_asked, switched, retired)
    assert_answers(server, "encoder", "2.0", versions)
    r = predict(server, "encoder/1.0", versions["images"][0])  # still registered, without a worker
    assert r.status_code == 503 and "has no worker" in r.text, (r.status_code, r.text)


@pytest.mark.server
def test_model_api_on_registers_2_0_switches_and_unregisters_1_0_under_load(versions, start_server):
    server = start_server("encoder=encoder-1.0.mar", enable_model_api="true")
    server.wait_for_workers("encoder/1.0")
    assert served_versions(server) == ["1.0"]

    client = EmbeddingClient(server.inference_url, "encoder", token=server.keys["inference"], timeout=CLIENT_TIMEOUT_S)
    with client, Traffic(client, versions["images"]) as traffic:
        traffic.wait_for_answers(sent_after=0.0)
        r = manage(server, "POST", "/models", url="encoder-2.0.mar", initial_workers=1, synchronous="true")
        assert r.status_code == 200, r.text
        assert served_versions(server) == ["1.0", "2.0"]
        assert_answers(server, "encoder/2.0", "2.0", versions)
        r = manage(server, "DELETE", "/models/encoder/1.0")  # the default version can't go
        assert r.status_code == 403 and "default version" in r.text, (r.status_code, r.text)
        switch_asked = time.monotonic()
        set_default(server, "2.0")
        switched = time.monotonic()
        traffic.wait_for_answers(sent_after=switched)
        wait_until_drained(server, "encoder/1.0")
        r = manage(server, "DELETE", "/models/encoder/1.0")
        assert r.status_code == 200, r.text
        retired = time.monotonic()
        traffic.wait_for_answers(sent_after=retired)
        answers = traffic.stop()
    check_rollout(answers, versions["references"], switch_asked, switched, retired)
    assert served_versions(server) == ["2.0"]
    assert_answers(server, "encoder", "2.0", versions)
    r = predict(server, "encoder/1.0", versions["images"][0])
    assert r.status_code == 404, (r.status_code, r.text)
