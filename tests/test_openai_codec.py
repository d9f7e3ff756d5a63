"""The OpenAI-style embeddings body, in process: what the `openai` SDK sends and reads, checked against
the example model through a forward hook (image_embedder_testkit.reference), every item alone in its
request's batch, and each refusal in OpenAI's error shape. The SDK against a real TorchServe:
tests/test_openai_server.py."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import Request

ROUTE = {"url_path": "v1/embeddings"}


def pixels(seed: int, size: int = 224) -> np.ndarray:
    """(H, W, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_url(hwc: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(hwc).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def npy_url(chw: np.ndarray) -> str:
    return "data:application/x-npy;base64," + base64.b64encode(npy_bytes(chw)).decode()


def post(service, body: dict, headers: dict = ROUTE):
    [resp] = service.predict([Request(json.dumps(body).encode(), "application/json", dict(headers))])
    return resp


def floats(resp) -> np.ndarray:
    assert resp.status == 200, resp.body[:300]
    doc = resp.json()
    assert doc["object"] == "list" and doc["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [d["index"] for d in doc["data"]] == list(range(len(doc["data"])))
    assert {d["object"] for d in doc["data"]} == {"embedding"}
    return np.asarray([d["embedding"] for d in doc["data"]], dtype=np.float32)


def error_of(resp, status: int, code: str, *words: str) -> dict:
    assert resp.status == status, resp.body[:300]
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    for word in words:
        assert word in error["message"], error
    return error


def test_png_npy_and_bare_base64_items_match_the_model(example_service, example_model):
    a, b = pixels(1), pixels(2)
    c = np.random.default_rng(3).random((3, 224, 224), dtype=np.float32)
    bare = png_url(b).split(",", 1)[1]
    resp = post(example_service, {"model": "my-name", "input": [png_url(a), bare, npy_url(c)]})
    got = floats(resp)
    expected = reference_embeddings(example_model, "conv1", np.stack([a.transpose(2, 0, 1), b.transpose(2, 0, 1), c]))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert resp.json()["model"] == "my-name"


def test_a_jpeg_item_is_the_pixels_pillow_decodes(example_service, example_model):
    out = io.BytesIO()
    Image.fromarray(pixels(11)).save(out, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB")).transpose(2, 0, 1)
    url = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
    np.testing.assert_allclose(floats(post(example_service, {"input": [url]})),
                               reference_embeddings(example_model, "conv1", np.ascontiguousarray(decoded)[None]), atol=1e-4)


def test_a_string_input_is_one_item_and_the_model_defaults_to_the_served_name(example_service, example_model):
    a = pixels(4)
    resp = post(example_service, {"input": png_url(a)})
    np.testing.assert_allclose(floats(resp), reference_embeddings(example_model, "conv1", a.transpose(2, 0, 1)[None]),
                               atol=1e-4)
    assert resp.json()["model"] == "encoder"


def test_base64_encoding_is_little_endian_float32_as_the_sdk_decodes_it(example_service):
    items = [png_url(pixels(5)), png_url(pixels(6))]
    as_floats = floats(post(example_service, {"input": items, "encoding_format": "float"}))
    doc = post(example_service, {"input": items, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in doc["data"]])
    np.testing.assert_array_equal(decoded, as_floats)


def test_the_body_alone_picks_the_format_on_the_plain_route(example_service):
    items = [png_url(pixels(7))]
    routed, plain = example_service.predict([
        Request(json.dumps({"input": items}).encode(), "application/json", dict(ROUTE)),
        Request(json.dumps({"input": items}).encode(), "application/json"),
    ])
    np.testing.assert_array_equal(floats(routed), floats(plain))


def test_accept_npy_still_answers_npy(example_service):
    resp = post(example_service, {"input": [png_url(pixels(8))]}, {**ROUTE, "Accept": "application/x-npy"})
    assert resp.status == 200 and resp.content_type == "application/x-npy"
    assert np.load(io.BytesIO(resp.body)).shape == (1, 10)


def test_models_route_lists_the_served_model(example_service):
    [resp] = example_service.predict([Request(b"", "application/json", {"url_path": "v1/models"})])
    assert resp.status == 200
    assert resp.json() == {"object": "list", "data": [
        {"id": "encoder", "object": "model", "created": 0, "owned_by": "image-embedder"}]}


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cat.png", "https://example.com/a.jpg", "file:///etc/passwd",
                                 "ftp://host/x.png", "s3://bucket/key.png"])
def test_a_url_is_refused_unread(example_service, url):
    error = error_of(post(example_service, {"input": [png_url(pixels(9)), url]}), 400, "UrlNotFetched",
                     "input[1]", "fetches nothing")
    assert error["param"] == "input"


@pytest.mark.parametrize("body, code, words", [
    ({"input": ["a photo of a cat"]}, "InvalidBase64", ["input[0]", "not text"]),
    ({"input": [[101, 202, 303]]}, "InvalidOpenAIRequest", ["input[0]", "token ids"]),
    ({"input": []}, "InvalidOpenAIRequest", ["non-empty"]),
    ({"input": ["data:image/png,abc"]}, "InvalidOpenAIRequest", [";base64,"]),
    ({"input": ["data:image/png;base64,aGVsbG8="]}, "InvalidImage", ["input[0]"]),
    ({"input": ["x"], "encoding_format": "int8"}, "InvalidOpenAIRequest", ["'int8'", "float", "base64"]),
    ({"input": ["x"], "dimensions": 0}, "InvalidOutputOption", ["dimensions", "positive integer"]),
    ({"input": ["x"], "modality": "text"}, "InvalidOpenAIRequest", ["'text'", "images"]),
    ({"inputs": []}, "InvalidOpenAIRequest", ["'inputs'"]),
])
def test_refusals_name_the_problem_in_openai_shape(example_service, body, code, words):
    error_of(post(example_service, body), 400, code, *words)


def test_a_batch_of_several_images_in_one_item_is_refused(example_service):
    batch = np.zeros((2, 3, 8, 8), np.float32)
    url = "data:application/x-npy;base64," + base64.b64encode(npy_bytes(batch)).decode()
    error_of(post(example_service, {"input": [url]}), 400, "InvalidOpenAIRequest", "2 images", "one image")


def test_limits_apply_as_for_every_body(example_service):
    too_many = [npy_url(np.zeros((3, 8, 8), np.float32))] * 1025
    resp = post(example_service, {"input": too_many})
    assert resp.status == 413 and resp.json()["error"]["code"] == "TooManyImages"


def test_a_bad_item_fails_only_its_own_request(example_service, example_model):
    good, url = pixels(10), "http://127.0.0.1:9/x.png"
    responses = example_service.predict([
        Request(json.dumps({"input": [png_url(good)]}).encode(), "application/json", dict(ROUTE)),
        Request(json.dumps({"input": [png_url(good), url]}).encode(), "application/json", dict(ROUTE)),
        Request(npy_bytes(good.transpose(2, 0, 1).astype(np.float32))),
    ])
    expected = reference_embeddings(example_model, "conv1", good.transpose(2, 0, 1)[None])
    np.testing.assert_allclose(floats(responses[0]), expected, atol=1e-4)
    error_of(responses[1], 400, "UrlNotFetched")
    assert responses[2].status == 200
    np.testing.assert_allclose(np.asarray(responses[2].json()["embeddings"]), expected, atol=1e-4)
