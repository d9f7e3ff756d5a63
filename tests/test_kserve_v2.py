"""KServe v2 (Open Inference Protocol) against a real TorchServe: JSON bodies on /predictions/<name>
(single and batched tensors, several inputs, UINT8, ids echoed, concurrent requests batched together),
then NVIDIA's tritonclient itself, binary tensor data in and out, on TorchServe's /v2/models/<name>/infer
route and on /predictions; every answer checked against image_embedder_testkit.reference."""
import io
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton
from PIL import Image

from image_embedder_testkit.reference import reference_embeddings

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


# -- the binary tensor extension, with NVIDIA's tritonclient itself ---------------------------------


def triton_inputs(array, binary_in):
    tensor = triton.InferInput("pixels", list(array.shape), "FP32" if array.dtype == np.float32 else "UINT8")
    tensor.set_data_from_numpy(array, binary_data=binary_in)
    return [tensor]


def triton_client(server, concurrency=1):
    return triton.InferenceServerClient(server.inference_url.replace("http://", ""), concurrency=concurrency,
                                        network_timeout=120.0, connection_timeout=120.0)


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_tritonclient_on_the_v2_route(torchserve, conv1_model, binary_in, binary_out):
    """client.infer() posts to TorchServe's /v2/models/encoder/infer, which reaches our handler."""
    x = np.random.default_rng(43).random((3, 3, 24, 24), dtype=np.float32)
    client = triton_client(torchserve)
    try:
        result = client.infer("encoder", triton_inputs(x, binary_in), request_id="t1", headers=torchserve.headers(),
                              outputs=[triton.InferRequestedOutput("embedding", binary_data=binary_out)])
    finally:
        client.close()
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and result.get_response()["id"] == "t1"
    assert ("parameters" in result.get_output("embedding")) == binary_out  # binary_data_size when binary
    np.testing.assert_allclose(got, reference_embeddings(conv1_model, "conv1", x), atol=1e-5)


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_tritonclient_body_on_predictions(torchserve, conv1_model, binary_in, binary_out):
    """The same bytes tritonclient writes, posted to /predictions/encoder; its reader parses the answer."""
    x = (np.random.default_rng(44).random((2, 3, 20, 20)) * 255).astype(np.uint8)
    body, length = triton.InferenceServerClient.generate_request_body(
        triton_inputs(x, binary_in), outputs=[triton.InferRequestedOutput("embedding", binary_data=binary_out)])
    headers = torchserve.headers(**({} if length is None else {"Inference-Header-Content-Length": str(length)}))
    response = requests.post(f"{torchserve.inference_url}/predictions/encoder", data=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    header = response.headers.get("Inference-Header-Content-Length")  # TorchServe passes the handler's header on
    assert (header is not None) == binary_out
    result = triton.InferResult.from_response_body(response.content, header_length=None if header is None else int(header))
    np.testing.assert_allclose(result.as_numpy("embedding"),
                               reference_embeddings(conv1_model, "conv1", x.astype(np.float32)), atol=1e-4)


def test_bytes_inputs_carry_encoded_images(torchserve, conv1_model):
    pixels = [(np.random.default_rng(45 + i).random((18, 22, 3)) * 255).astype(np.uint8) for i in range(2)]
    encoded = []
    for p in pixels:
        out = io.BytesIO()
        Image.fromarray(p).save(out, format="PNG")
        encoded.append(out.getvalue())
    tensor = triton.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=object), binary_data=True)
    client = triton_client(torchserve)
    try:
        result = client.infer("encoder", [tensor], headers=torchserve.headers())
    finally:
        client.close()
    want = np.concatenate([reference_embeddings(conv1_model, "conv1", p.transpose(2, 0, 1).astype(np.float32))
                           for p in pixels])
    np.testing.assert_allclose(result.as_numpy("embedding"), want, atol=1e-4)


def test_concurrent_tritonclient_requests_batched_together(torchserve, conv1_model):
    """16 binary requests in flight at once (tritonclient's own async pool); batchSize 8 lets TorchServe
    hand several to one handle() call; each answer holds exactly its own rows."""
    rng = np.random.default_rng(46)
    inputs = [rng.random((1 + i % 3, 3, 24, 24), dtype=np.float32) for i in range(16)]
    client = triton_client(torchserve, concurrency=16)
    try:
        pending = [client.async_infer("encoder", triton_inputs(x, True), request_id=f"c{i}", headers=torchserve.headers())
                   for i, x in enumerate(inputs)]
        results = [p.get_result() for p in pending]
    finally:
        client.close()
    for i, (x, result) in enumerate(zip(inputs, results)):
        assert result.get_response()["id"] == f"c{i}"
        np.testing.assert_allclose(result.as_numpy("embedding"), reference_embeddings(conv1_model, "conv1", x), atol=1e-5)


def test_refusals_reach_tritonclient_with_their_message(torchserve):
    header = b'{"inputs":[{"name":"x","shape":[1,3,8,8],"datatype":"FP32","parameters":{"binary_data_size":768}}]}'
    response = requests.post(f"{torchserve.inference_url}/v2/models/encoder/infer", data=header + b"\0" * 700,
                             headers=torchserve.headers(**{"Inference-Header-Content-Length": str(len(header))}),
                             timeout=120)
    assert response.status_code == 400 and "runs past the body" in response.json()["message"]
    tensor = triton.InferInput("x", [1, 3, 8, 8], "INT64")
    tensor.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.int64))
    client = triton_client(torchserve)
    try:
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer("encoder", [tensor], headers=torchserve.headers())
    finally:
        client.close()
    assert info.value.status() == "400"
    assert "datatype 'INT64' is not supported" in info.value.message(), info.value.message()


def test_form_urlencoded_bodies(torchserve):
    """curl --data without -H Content-Type: a JSON body reaches the handler empty (415 naming the fix)."""
    url = f"{torchserve.inference_url}/predictions/encoder"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    response = requests.post(url, data=b'{"data": [[[1.0]]]}', headers=torchserve.headers(**form), timeout=120)
    assert response.status_code == 415 and "Content-Type: application/json" in response.json()["message"]
