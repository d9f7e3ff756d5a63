"""KServe v2 (Open Inference Protocol) bodies sent straight to our handler on /predictions/<name>:
single and batched tensors, several inputs, UINT8, ids echoed, many concurrent requests that
TorchServe batches together; every answer checked against tests/reference.py."""
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from reference import reference_embeddings

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def conv1_model(example_model):
    """The example cut after conv1: the reference's forward pass then runs on any image size
    (the served encoder stops after conv1 too), so the test's JSON bodies stay small."""
    return torch.nn.Sequential(OrderedDict(conv1=example_model.conv1)).eval()


def v2_request(*arrays, datatype="FP32", request_id=None):
    body = {"inputs": [{"name": f"input-{i}", "shape": list(a.shape), "datatype": datatype,
                        "data": a.ravel().tolist()} for i, a in enumerate(arrays)]}
    if request_id is not None:
        body["id"] = request_id
    return body


def post(server, body):
    return requests.post(f"{server.inference_url}/predictions/encoder", json=body, timeout=120,
                         headers=server.headers())


def v2_embeddings(response, model="encoder"):
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["model_name"] == model
    [output] = body["outputs"]
    assert output["name"] == "embedding" and output["datatype"] == "FP32"
    return body, np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def test_single_and_batched_tensors(torchserve, conv1_model):
    rng = np.random.default_rng(40)
    one = rng.random((3, 32, 32), dtype=np.float32)
    body, got = v2_embeddings(post(torchserve, v2_request(one, request_id="req-1")))
    assert body["id"] == "req-1" and got.shape == (1, 10)
    np.testing.assert_allclose(got, reference_embeddings(conv1_model, "conv1", one), atol=1e-5)

    batch = rng.random((4, 3, 32, 32), dtype=np.float32)
    other = rng.random((2, 3, 20, 28), dtype=np.float32)  # a second input of another size
    body, got = v2_embeddings(post(torchserve, v2_request(batch, other)))
    want = np.concatenate([reference_embeddings(conv1_model, "conv1", batch),
                           reference_embeddings(conv1_model, "conv1", other)])
    assert got.shape == (6, 10) and "id" not in body
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_uint8_tensor_is_not_rescaled(torchserve, conv1_model):
    pixels = np.random.default_rng(41).integers(0, 256, (2, 3, 16, 16)).astype(np.uint8)
    _, got = v2_embeddings(post(torchserve, v2_request(pixels, datatype="UINT8")))
    np.testing.assert_allclose(got, reference_embeddings(conv1_model, "conv1", pixels.astype(np.float32)), atol=1e-4)


def test_concurrent_v2_requests_each_get_their_own_rows(torchserve, conv1_model):
    rng = np.random.default_rng(42)
    inputs = [rng.random((1 + i % 3, 3, 24, 24), dtype=np.float32) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:  # batchSize 8: TorchServe hands several to one handle() call
        answers = list(pool.map(lambda ia: post(torchserve, v2_request(ia[1], request_id=f"r{ia[0]}")),
                                enumerate(inputs)))
    for i, (array, response) in enumerate(zip(inputs, answers)):
        body, got = v2_embeddings(response)
        assert body["id"] == f"r{i}"
        np.testing.assert_allclose(got, reference_embeddings(conv1_model, "conv1", array), atol=1e-5)


def test_bad_v2_bodies_are_clear_400s(torchserve):
    cases = [
        ({"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 10}]}, "needs 192 values"),
        ({"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "BOOL", "data": [0] * 192}]}, "BOOL"),
        ({"inputs": []}, "non-empty"),
    ]
    for body, needle in cases:
        response = post(torchserve, body)
        assert response.status_code == 400, response.text
        assert needle in response.json()["message"]
