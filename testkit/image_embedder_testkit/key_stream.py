"""A documented client streaming across key expiries, run in the background of the whole suite.

The one-minute-keys proof needs 135 s of wall time in which almost nothing happens (three requests a
second). Started before the first test (tests/conftest.py), its waiting overlaps the rest of the
suite; its test joins it and asserts on what it recorded.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Optional

import numpy as np
import requests

from image_embedder_client import EmbeddingClient
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.ts_server import TorchServe

STREAM_S = 135.0  # two key expiries at least: keys made at start expire within 60 s, renewed ones 60 s later
THREADS = 3  # sharing one client, as embed.py's threads do


def key_file_data(server: TorchServe) -> dict:
    with open(os.path.join(server.workdir, "key_file.json")) as f:
        return json.load(f)


def post_with_key(server: TorchServe, key: str, image: np.ndarray) -> requests.Response:
    """A plain request (no client library) with this inference key."""
    return requests.post(f"{server.inference_url}/predictions/encoder", data=npy_bytes(image), timeout=60,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"})


class KeyStream:
    """`THREADS` threads share one key_file client, one request a second each, for `seconds`; every answer
    (image index, embedding, seconds since start) and every failure is recorded for the test to assert,
    then key_file.json and the answer to a plain request with its inference key (`final_keys`, `fresh`)."""

    def __init__(self, server: TorchServe, images: np.ndarray, seconds: float = STREAM_S):
        self.server, self.images, self.seconds = server, images, seconds
        self.first_keys = key_file_data(server)
        self.client = EmbeddingClient(server.inference_url, "encoder",
                                      key_file=os.path.join(server.workdir, "key_file.json"),
                                      management_url=server.management_url, retries=0)
        self.answers: list[tuple[int, np.ndarray, float]] = []
        self.failures: list[str] = []
        self.final_keys: dict = {}
        self.fresh: Optional[requests.Response] = None
        self._stop = threading.Event()
        self.start = time.monotonic()
        self._runner = threading.Thread(target=self._run, daemon=True)
        self._runner.start()

    def _run(self) -> None:
        threads = [threading.Thread(target=self._stream, args=(k,), daemon=True) for k in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # At once, while the key the client renewed last is still live (the test may run minutes later):
        # key_file.json as it is now, and a plain request with its inference key.
        try:
            self.final_keys = key_file_data(self.server)
            self.fresh = post_with_key(self.server, self.final_keys["inference"]["key"], self.images[1])
        except Exception as exc:  # recorded, asserted by the test
            self.failures.append(f"the final snapshot: {exc!r}")

    def _stream(self, offset: int) -> None:
        n = offset
        while time.monotonic() - self.start < self.seconds and not self._stop.is_set():
            i = n % len(self.images)
            try:
                self.answers.append((i, self.client.embed(self.images[i]), time.monotonic() - self.start))
            except Exception as exc:  # recorded, asserted by the test
                self.failures.append(repr(exc))
            n += 1
            self._stop.wait(1.0)  # pacing: one request a second per thread, not a wait for a state

    def join(self) -> None:
        """Block until the stream has run its full time and taken its final snapshot (at once if it has)."""
        self._runner.join(timeout=self.seconds + 300)
        if self._runner.is_alive():
            raise TimeoutError(f"the key stream did not end within {self.seconds + 300} s")

    def stop(self) -> None:
        """End the stream early (the session is over before its test ran)."""
        self._stop.set()
        self._runner.join(timeout=120)
