"""The shipped log4j2.xml (every launcher's --log-config): one access-log line a request and none of
TorchServe's ~45 others, while the startup lines stay. The same requests to a TorchServe on its own
log4j2.xml show that each line the shipped one drops is real."""
import numpy as np
import pytest
import requests

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.server_logs import LOGS, PER_REQUEST, accesses, per_request_lines, read_log, wait_for
from image_embedder_testkit.ts_server import TorchServe, java_available

REQUESTS = 4
PATH = "/predictions/encoder"


def embed(server: TorchServe) -> None:
    body = npy_bytes(np.zeros((1, 3, 8, 8), np.uint8))
    for _ in range(REQUESTS):
        r = requests.post(server.inference_url + PATH, data=body, timeout=120,
                          headers=server.headers(**{"Content-Type": "application/x-npy"}))
        assert r.status_code == 200, r.text


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
    before = accesses(torchserve.workdir, PATH)
    embed(torchserve)
    assert wait_for(lambda: accesses(torchserve.workdir, PATH) == before + REQUESTS)

    # the same requests on TorchServe's own config: every dropped line is there, once a request or more
    # (the shipped server's requests went first, so its workers' lines had longer to arrive)
    embed(torchserve_logging)
    chatty = lambda: "".join(read_log(torchserve_logging.workdir, rel) for rel in LOGS)  # noqa: E731
    assert wait_for(lambda: all(chatty().count(line) >= REQUESTS for line in PER_REQUEST)), \
        {line: chatty().count(line) for line in PER_REQUEST}
    assert accesses(torchserve_logging.workdir, PATH) >= REQUESTS

    assert per_request_lines(torchserve.workdir) == {}
    for rel in LOGS:  # a worker's own line: model_log, ts_log and stdout
        assert "image encoder ready: " in read_log(torchserve.workdir, rel), rel
    assert "Torchserve version: " in read_log(torchserve.workdir, "logs/ts_log.log")  # the frontend's startup
