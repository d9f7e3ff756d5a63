"""The KServe storage layout served exactly as KServe's kserve-torchserve runtime starts it
(image_embedder_testkit.kserve_server), driven the way KServe's wrapper drives it: KServe v1 and v2 JSON bodies on
/predictions/encoder (what the wrapper forwards to), on TorchServe's own /v1 and /v2 routes, and
with tritonclient; many concurrent clients against one worker (batchSize 16, maxBatchDelay 100 ms),
so TorchServe batches them (by hand: RequestsPerBatch reached 16 for 24 clients); every answer
compared with image_embedder_testkit.reference. Also what does not work: the serviceEnvelope label set (TorchServe's
kserve/kservev2 envelopes) fails every request."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import yaml

from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.kserve_server import KServeLayoutServer
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.server_logs import accesses, per_request_lines, wait_for

ROUTES = ("/predictions/encoder", "/v1/models/encoder:predict", "/v2/models/encoder/infer")


@pytest.fixture(scope="module")
def layout(example_archive, tmp_path_factory) -> str:
    """scripts/kserve_layout.py run as the docs run it, on the example's archive."""
    out = tmp_path_factory.mktemp("kserve") / "models"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "kserve_layout.py"), example_archive, str(out),
                    "--max-batch-delay", "100"], check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def kserve_server(layout):
    server = KServeLayoutServer(layout, envelope="")  # the label unset: KServe sets TS_SERVICE_ENVELOPE=""
    yield server.start()
    server.cleanup()


@pytest.fixture(scope="module")
def conv1_model(example_model):
    """The example cut after conv1 (the served layer), so the bodies can use small images."""
    return torch.nn.Sequential(OrderedDict(conv1=example_model.conv1)).eval()


def test_layout_files(layout, example_archive):
    assert sorted(os.listdir(layout)) == ["config", "model-store"]
    assert os.listdir(os.path.join(layout, "model-store")) == ["encoder.mar"]
    with open(os.path.join(layout, "model-store", "encoder.mar"), "rb") as a, open(example_archive, "rb") as b:
        assert a.read() == b.read()
    props = {}
    with open(os.path.join(layout, "config", "config.properties")) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                key, value = line.rstrip("\n").split("=", 1)
                props[key] = value
    assert props["enable_envvars_config"] == "true" and props["model_store"] == "/mnt/models/model-store"
    # the launchers' log config, beside the config that names it (KServe's runtime passes no --log-config)
    assert sorted(os.listdir(os.path.join(layout, "config"))) == ["config.properties", "log4j2.xml"]
    assert props["vmargs"] == "-Dlog4j.configurationFile=file:///mnt/models/config/log4j2.xml"
    with open(os.path.join(layout, "config", "log4j2.xml")) as a, open(os.path.join(REPO, "log4j2.xml")) as b:
        assert a.read() == b.read()
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
    model = json.loads(props["model_snapshot"])["models"]["encoder"]["1.0"]
    # the conftest archive has no model-config of its own: build_mar's documented defaults, delay from the
    # flag, and (no worker count in the archive) one worker per CPU the CPU InferenceService requests
    with open(os.path.join(REPO, "deploy", "kserve", "inferenceservice-cpu.yaml")) as f:
        cpus = int(yaml.safe_load(f)["spec"]["predictor"]["model"]["resources"]["requests"]["cpu"])
    assert (model["marName"], model["batchSize"], model["maxBatchDelay"], model["minWorkers"]) == ("encoder.mar", 16, 100, cpus)


def test_layout_refuses_a_missing_archive(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "kserve_layout.py"),
                          str(tmp_path / "nope.mar"), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "nope.mar" in run.stderr and "build_mar.py" in run.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "text.mar").write_text("not a zip")
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "kserve_layout.py"),
                          str(tmp_path / "text.mar"), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "text.mar" in run.stderr and "MAR-INF/MANIFEST.json" in run.stderr
    assert not (tmp_path / "out").exists()


def v1_body(images: np.ndarray) -> dict:
    return {"instances": images.tolist()}


def v2_body(images: np.ndarray, request_id: str) -> dict:
    return {"id": request_id, "inputs": [{"name": "input-0", "shape": list(images.shape), "datatype": "FP32",
                                          "data": images.ravel().tolist()}]}


def embeddings_from(response: requests.Response, protocol: str, request_id: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    if protocol == "v1":
        return np.asarray(body["predictions"], dtype=np.float32)
    assert body["id"] == request_id and body["model_name"] == "encoder"
    [output] = body["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


@pytest.mark.server
def test_concurrent_v1_and_v2_bodies_on_every_route(kserve_server, conv1_model):
    """24 clients at once, v1 and v2 mixed, images of several sizes, batch sizes 1-3: each gets its own rows."""
    rng = np.random.default_rng(10)
    cases = []
    for i in range(24):
        size = (8, 12, 16)[i % 3]
        images = rng.random((1 + i % 3, 3, size, size), dtype=np.float32)
        cases.append((ROUTES[i % 3], "v1" if i % 2 else "v2", images, f"req-{i}"))

    def send(case):
        route, protocol, images, request_id = case
        body = v1_body(images) if protocol == "v1" else v2_body(images, request_id)
        return requests.post(kserve_server.inference_url + route, json=body, timeout=120)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(send, cases))
    for (route, protocol, images, request_id), response in zip(cases, responses):
        got = embeddings_from(response, protocol, request_id)
        np.testing.assert_allclose(got, reference_embeddings(conv1_model, "conv1", images), atol=1e-5,
                                   err_msg=f"{route} {protocol} {request_id}")


@pytest.mark.server
def test_a_bad_body_in_a_batch_costs_the_others_nothing(kserve_server, conv1_model):
    rng = np.random.default_rng(11)
    good = [rng.random((2, 3, 8, 8), dtype=np.float32) for _ in range(6)]
    bad = v2_body(good[0], "bad")
    bad["inputs"][0]["datatype"] = "FP99"
    bodies = [v2_body(images, f"ok-{i}") for i, images in enumerate(good)]
    bodies.insert(3, bad)
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: requests.post(
            kserve_server.inference_url + "/v2/models/encoder/infer", json=body, timeout=120), bodies))
    refused = responses.pop(3)
    assert refused.status_code == 400 and "FP99" in refused.json()["message"]
    for i, (images, response) in enumerate(zip(good, responses)):
        np.testing.assert_allclose(embeddings_from(response, "v2", f"ok-{i}"),
                                   reference_embeddings(conv1_model, "conv1", images), atol=1e-5)


@pytest.mark.server
def test_the_layouts_log_config_is_the_launchers(kserve_server):
    """vmargs names the layout's log4j2.xml: a request writes its access-log line and none of the others."""
    before = accesses(kserve_server.workdir, ROUTES[0])
    images = np.zeros((1, 3, 8, 8), np.float32)
    assert requests.post(kserve_server.inference_url + ROUTES[0], json=v1_body(images), timeout=120).status_code == 200
    assert wait_for(lambda: accesses(kserve_server.workdir, ROUTES[0]) == before + 1)
    assert per_request_lines(kserve_server.workdir) == {}


@pytest.mark.server
def test_tritonclient_async_requests(kserve_server, conv1_model):
    """The Triton/KServe v2 HTTP client (JSON, not binary tensors), 8 requests in flight at once."""
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=kserve_server.inference_url.split("//", 1)[1], concurrency=8)
    rng = np.random.default_rng(12)
    batches = [rng.random((1 + i % 4, 3, 12, 12), dtype=np.float32) for i in range(8)]
    try:
        pending = []
        for i, images in enumerate(batches):
            tensor = httpclient.InferInput("input-0", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images, binary_data=False)
            output = httpclient.InferRequestedOutput("embedding", binary_data=False)
            pending.append(client.async_infer("encoder", [tensor], outputs=[output], request_id=f"t{i}"))
        for i, (images, request) in enumerate(zip(batches, pending)):
            result = request.get_result()
            assert result.get_response()["id"] == f"t{i}"
            np.testing.assert_allclose(result.as_numpy("embedding"),
                                       reference_embeddings(conv1_model, "conv1", images), atol=1e-5)
    finally:
        client.close()


@pytest.mark.server
@pytest.mark.parametrize("envelope", ["kserve", "kservev2"])
def test_service_envelope_label_breaks_every_request(layout, envelope):
    """What does not work: with the serviceEnvelope label set, TorchServe's envelope hands the handler
    the first request's inner payload instead of the batch's requests: every request fails."""
    server = KServeLayoutServer(layout, envelope=envelope).start()
    try:
        images = np.random.default_rng(13).random((1, 3, 8, 8), dtype=np.float32)
        for route, body in (("/v1/models/encoder:predict", v1_body(images)),
                            ("/v2/models/encoder/infer", v2_body(images, "e"))):
            response = requests.post(server.inference_url + route, json=body, timeout=120)
            assert response.status_code == 503, response.text
    finally:
        server.cleanup()
