"""Opt-in: KServe's own TorchServe wrapper (the process that answers on 8080 in the kserve-torchserve
runtime) in front of the layout served as KServe starts it, for both protocolVersion settings.

Needs what the runtime image has, outside this project's venv (kserve's server dependencies are
heavy and the wrapper's files are not ours to ship):

    python3 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install 'kserve[storage]==0.13.0'   # the runtime image's pin
    # kubernetes/kserve/kserve_wrapper/*.py from pytorch/serve, with inference_pb2*.py generated
    # from frontend/server/src/main/resources/proto/inference.proto
    KSERVE_WRAPPER_PYTHON=/tmp/kvenv/bin/python KSERVE_WRAPPER_DIR=/path/to/kserve_wrapper pytest tests/test_deploy_kserve_wrapper.py

Skipped without those variables. The wrapper starts from its own classes exactly as its __main__.py
does, except for free ports instead of its fixed 8080/8081.
"""
from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
import requests

from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_server import free_ports
from test_deploy_kserve import conv1_model, embeddings_from, kserve_server, layout, v1_body, v2_body  # noqa: F401

pytestmark = [pytest.mark.server, pytest.mark.skipif(
    not (os.environ.get("KSERVE_WRAPPER_PYTHON") and os.environ.get("KSERVE_WRAPPER_DIR")),
    reason="set KSERVE_WRAPPER_PYTHON and KSERVE_WRAPPER_DIR (see the module docstring)")]

# The wrapper's __main__.py, with the ports it hardcodes taken from the environment.
LAUNCHER = """
import os, runpy, sys
sys.path.insert(0, os.environ["KSERVE_WRAPPER_DIR"])
import kserve.model_server
_start = kserve.model_server.ModelServer.__init__
def _init(self, *args, **kwargs):
    kwargs.update(http_port=int(os.environ["WRAPPER_HTTP_PORT"]), grpc_port=int(os.environ["WRAPPER_GRPC_PORT"]))
    _start(self, *args, **kwargs)
kserve.model_server.ModelServer.__init__ = _init
runpy.run_path(os.path.join(os.environ["KSERVE_WRAPPER_DIR"], "__main__.py"), run_name="__main__")
"""


@pytest.fixture(params=["v1", "v2"])
def wrapper(request, kserve_server, tmp_path):
    http_port, grpc_port = free_ports(2)
    env = dict(os.environ, CONFIG_PATH=kserve_server.config_path, PROTOCOL_VERSION=request.param,
               WRAPPER_HTTP_PORT=str(http_port), WRAPPER_GRPC_PORT=str(grpc_port), MODEL_LOAD_DELAY="1")
    log = open(tmp_path / "wrapper.log", "wb")
    process = subprocess.Popen([os.environ["KSERVE_WRAPPER_PYTHON"], "-c", LAUNCHER], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert process.poll() is None, (tmp_path / "wrapper.log").read_text()
            try:
                if requests.get(url + "/v2/models/encoder/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        else:
            raise TimeoutError((tmp_path / "wrapper.log").read_text())
        yield request.param, url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_v1_and_v2_through_kserves_wrapper(wrapper, conv1_model):
    protocol, url = wrapper
    rng = np.random.default_rng(20)
    images = rng.random((2, 3, 8, 8), dtype=np.float32)
    want = reference_embeddings(conv1_model, "conv1", images)
    got = embeddings_from(requests.post(url + "/v2/models/encoder/infer", json=v2_body(images, "w2"), timeout=60),
                          "v2", "w2")
    np.testing.assert_allclose(got, want, atol=1e-5)
    response = requests.post(url + "/v1/models/encoder:predict", json=v1_body(images), timeout=60)
    if protocol == "v1":  # the setting deploy/kserve/*.yaml use: both protocols pass through
        np.testing.assert_allclose(embeddings_from(response, "v1", ""), want, atol=1e-5)
    else:  # protocolVersion v2: the wrapper reads every answer as a v2 response
        assert response.status_code == 500 and "outputs" in response.text
