"""The shipped log4j2.xml (every launcher's --log-config): one access-log line a request and none of
TorchServe's ~45 others, while the startup lines stay. The same requests to a TorchServe on its own
log4j2.xml show that each line the shipped one drops is real."""
import os
import time

import numpy as np
import pytest
import requests

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.ts_server import TorchServe, java_available

REQUESTS = 4
# what TorchServe 0.12 writes per request that the shipped config drops, and where it writes it
PER_REQUEST = ("Backend received inference at: ", "Looping backend response at: ", "Backend response time: ",
               "Sending response for jobId ", "result=[METRICS]ImagesEmbedded", "[DEBUG]")
LOGS = ("logs/ts_log.log", "logs/model_log.log", "torchserve.out")  # the last: the launcher's stdout


def read(server: TorchServe, rel: str) -> str:
    try:
        with open(os.path.join(server.workdir, rel), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def accesses(server: TorchServe) -> int:
    return read(server, "logs/access_log.log").count('"POST /predictions/encoder HTTP/1.1" 200')


def embed(server: TorchServe) -> None:
    body = npy_bytes(np.zeros((1, 3, 8, 8), np.uint8))
    for _ in range(REQUESTS):
        r = requests.post(f"{server.inference_url}/predictions/encoder", data=body, timeout=120,
                          headers=server.headers(**{"Content-Type": "application/x-npy"}))
        assert r.status_code == 200, r.text


def wait_for(check, timeout: float = 60.0) -> bool:
    """The workers' lines reach the frontend's files through a reader thread: poll."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def torchserve_logging(model_store, example_archive):
    """The example on TorchServe's own log4j2.xml (no --log-config)."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    server = TorchServe(model_store, "encoder=encoder.mar", log_config=None).serve("encoder")
    yield server
    server.cleanup()


@pytest.mark.server
def test_one_access_line_a_request_and_the_startup_lines(torchserve, torchserve_logging):
    torchserve.wait_for_workers("encoder", 1)
    before = accesses(torchserve)
    embed(torchserve)
    assert wait_for(lambda: accesses(torchserve) == before + REQUESTS), (before, accesses(torchserve))

    # the same requests on TorchServe's own config: every dropped line is there, once a request or more
    # (the shipped server's requests went first, so its workers' lines had longer to arrive)
    embed(torchserve_logging)
    chatty = lambda: "".join(read(torchserve_logging, rel) for rel in LOGS)  # noqa: E731
    assert wait_for(lambda: all(chatty().count(line) >= REQUESTS for line in PER_REQUEST)), \
        {line: chatty().count(line) for line in PER_REQUEST}
    assert accesses(torchserve_logging) >= REQUESTS

    for rel in LOGS:
        text = read(torchserve, rel)
        assert not [line for line in PER_REQUEST if line in text], rel
        assert "image encoder ready: " in text, rel  # a worker's own line: model_log, ts_log and stdout
    assert "Torchserve version: " in read(torchserve, "logs/ts_log.log")  # the frontend's startup
