"""What the server says, in process (TorchServe's own Service.predict): KServe v2 binary in and out with the
Inference-Header-Content-Length response header, describe before and after the first pass, 415 for form
bodies, repeated multipart part names, the HWC hint, TorchServe's own `profile` key under `handler:`.
Embeddings are checked against image_embedder_testkit.reference."""
from __future__ import annotations

import io
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel, Request, parse_predict_response
from image_embedder_tools.build import ArchiveSpec, build_archive

SETTINGS = {"profile": True, "resize": 20, "center_crop": 16, "scale": 0.5, "mean": [0.1, 0.2, 0.3],
            "std": [2.0, 2.0, 2.0]}


@pytest.fixture(scope="module")
def plain(example_files, tmp_path_factory):
    """The example at conv1, built WITHOUT --input-shape, with image preprocessing and TorchServe's `profile`."""
    mar = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                    "conv1", name="plain", export_path=str(tmp_path_factory.mktemp("plain")),
                                    settings=SETTINGS), quiet=True)
    return InProcessModel(mar, model_name="plain")


def images(seed, shape=(2, 3, 16, 16)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def expected(example_model, x):
    """What the `plain` archive serves for float arrays: scale, mean, std, then conv1 pooled."""
    mean, std = np.array(SETTINGS["mean"], np.float32), np.array(SETTINGS["std"], np.float32)
    x = (np.asarray(x, np.float32) * SETTINGS["scale"] - mean[:, None, None]) / std[:, None, None]
    conv1_only = torch.nn.Sequential(OrderedDict(conv1=example_model.conv1)).eval()  # any image size
    return reference_embeddings(conv1_only, "conv1", x)


def predict_raw(service, parameters: list[dict], headers: dict) -> "list":
    """One request with several parameters (multipart parts), as the worker receives it."""
    batch = [{"requestId": b"r1", "parameters": parameters,
              "headers": [{"name": k.encode(), "value": str(v).encode()} for k, v in headers.items()]}]
    return parse_predict_response(service.service.predict(batch), 1)


def test_describe_learns_embedding_dim_and_lists_preprocessing(plain, example_model):
    [before] = plain.predict([Request(b"", headers={"describe": "true"})])
    doc = before.json()
    assert doc["embedding_dim"] is None and doc["input_shape"] is None  # nothing ran yet
    summary = doc["preprocessing"].pop("summary")
    assert doc["preprocessing"] == {"color_mode": "auto", "resize": 20, "center_crop": 16, "scale": 0.5,
                                    "mean": [0.1, 0.2, 0.3], "std": [2.0, 2.0, 2.0]}
    assert summary.startswith("PNG/JPEG resized to 20 on the shorter side, center-cropped to 16x16;")
    assert "pixels 0..255 times 0.5 (0..127.5), minus mean [0.1, 0.2, 0.3], divided by std [2, 2, 2]" in summary
    assert doc["limits"] == {"max_images_per_request": 1024, "max_batch_pixels": 32 * 3 * 512 * 512}
    assert "application/x-npy" in doc["content_types"] and "image/png" in doc["content_types"]
    x = images(1)
    [served] = plain.predict([Request(npy_bytes(x))])
    got = np.asarray(served.json()["embeddings"], np.float32)
    np.testing.assert_allclose(got, expected(example_model, x), atol=1e-5)
    [after] = plain.predict([Request(b"", headers={"describe": "true"})])
    assert after.json()["embedding_dim"] == got.shape[1] == 10


def test_profile_key_reaches_torchserves_timer(plain):
    """`profile: true` under handler: is TorchServe's: its @timed then records the steps' times."""
    recorded = []
    metrics = plain.service.context.metrics
    original = metrics.add_time

    def spy(name, *args, **kwargs):
        recorded.append(name)
        return original(name, *args, **kwargs)

    metrics.add_time = spy
    try:
        plain.predict([Request(npy_bytes(images(2)))])
    finally:
        metrics.add_time = original
    assert {"ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess"} <= set(recorded), recorded


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_kserve_v2_binary_in_and_out(plain, example_model, binary_in, binary_out):
    x = images(3)
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    outputs = [triton.InferRequestedOutput("embedding", binary_data=binary_out)]
    body, length = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs, request_id="a1")
    headers = {} if length is None else {"Inference-Header-Content-Length": length}
    good_before, resp, good_after = plain.predict([Request(npy_bytes(x[:1])), Request(body, "", headers),
                                                   Request(npy_bytes(x[1:]))])
    assert resp.status == 200, resp.body[:300]
    header = resp.headers.get("Inference-Header-Content-Length")
    assert (header is not None) == binary_out
    assert resp.content_type == ("application/octet-stream" if binary_out else "application/json")
    result = triton.InferResult.from_response_body(resp.body, header_length=None if header is None else int(header))
    want = expected(example_model, x)
    np.testing.assert_allclose(result.as_numpy("embedding"), want, atol=1e-5)
    assert result.get_response()["id"] == "a1"
    for neighbour, rows in ((good_before, want[:1]), (good_after, want[1:])):
        np.testing.assert_allclose(np.asarray(neighbour.json()["embeddings"], np.float32), rows, atol=1e-5)


def test_malformed_binary_bodies_each_their_own_400(plain, example_model):
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 3072}}]}).encode()
    good = header + images(4, (1, 3, 16, 16)).tobytes()
    n = str(len(header))
    cases = [
        (good, str(len(good) + 5), "Inference-Header-Content-Length"),
        (good[:-4], n, "runs past the body"),
        (good + b"\0\0\0\0", n, "add up to 3072"),
        (good.replace(b"3072", b"-307"), n, "non-negative"),
        (good.replace(b"3072", b"9999"), n, "runs past the body"),
    ]
    x = images(5, (1, 3, 16, 16))
    batch = [Request(npy_bytes(x))] + [Request(body, "application/octet-stream", {"Inference-Header-Content-Length": h})
                                       for body, h, _ in cases] + [Request(npy_bytes(x))]
    responses = plain.predict(batch)
    for resp, (_, _, words) in zip(responses[1:-1], cases):
        assert resp.status == 400 and resp.content_type == "application/json", resp.body[:200]
        assert resp.json()["type"] == "InvalidKServeV2" and words in resp.json()["message"], resp.json()
    for resp in (responses[0], responses[-1]):
        np.testing.assert_allclose(np.asarray(resp.json()["embeddings"], np.float32), expected(example_model, x), atol=1e-5)


def test_form_urlencoded_body_is_415_naming_the_fix(plain):
    # curl --data without -H Content-Type: TorchServe parses the body as a form; the handler gets no body
    [resp] = predict_raw(plain, [], {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": 14})
    assert resp.status == 415
    doc = resp.json()
    assert doc["type"] == "UnsupportedMediaType" and "-H 'Content-Type: application/json'" in doc["message"]


def png_bytes(seed) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((24, 24, 3)) * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_repeated_multipart_names_are_refused_not_dropped(plain):
    a, b = png_bytes(6), png_bytes(7)
    boundary = "6df86a73cc384c147ff41e8cfcacdbb9"
    framing = lambda name: len(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x.png"\r\n'
                               'Content-Type: image/png\r\n\r\n\r\n')
    ctype = f"multipart/form-data; boundary={boundary}"
    # TorchServe kept only the last `img` part (b): the body's length still counts both
    length = framing("img") * 2 + len(a) + len(b) + len(boundary) + 6
    [resp] = predict_raw(plain, [{"name": "img", "contentType": "image/png", "value": bytearray(b)}],
                         {"Content-Type": ctype, "Content-Length": length, "img": "image/png"})
    assert resp.status == 400, resp.body[:300]
    doc = resp.json()
    assert doc["type"] == "RepeatedPartName" and "-F img0=@a.jpg -F img1=@b.png" in doc["message"]
    # distinct names: both parts arrive, both are embedded, in order
    length = framing("img0") + framing("img1") + len(a) + len(b) + len(boundary) + 6
    [resp] = predict_raw(plain, [{"name": "img0", "contentType": "image/png", "value": bytearray(a)},
                                 {"name": "img1", "contentType": "image/png", "value": bytearray(b)}],
                         {"Content-Type": ctype, "Content-Length": length})
    assert resp.status == 200, resp.body[:300]
    assert np.asarray(resp.json()["embeddings"]).shape == (2, 10)


def test_hwc_array_gets_the_transpose_hint(plain, example_service):
    hwc = images(8, (16, 16, 3))
    [resp] = plain.predict([Request(npy_bytes(hwc))])  # mean/std of 3 values meet 16 "channels"
    assert (resp.status, resp.json()["type"]) == (400, "ChannelMismatch")
    assert "send (C,H,W)" in resp.json()["message"] and "transpose(2, 0, 1)" in resp.json()["message"]
    [resp] = example_service.predict([Request(npy_bytes(images(8, (224, 224, 3))))])  # the model itself refuses
    assert (resp.status, resp.json()["type"]) == (422, "ModelRejectedInput")
    assert "looks like (H,W,C): send (C,H,W)" in resp.json()["message"]
    [resp] = example_service.predict([Request(npy_bytes(images(9, (4, 224, 224))))])  # a real (C,H,W): no hint
    assert resp.status == 422 and "transpose" not in resp.json()["message"]


def test_v2_refusals_also_carry_error_for_kserve_clients(plain):
    """tritonclient reads a refusal's message from `error`; other protocols keep {"code", "type", "message"}."""
    bad_v2 = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "INT64", "data": [0] * 48}]}).encode()
    hwc_v2 = json.dumps({"inputs": [{"name": "x", "shape": [1, 4, 4, 3], "datatype": "FP32", "data": [0.5] * 48}]}).encode()
    v2, v2_late, npy = plain.predict([Request(bad_v2, "application/json"), Request(hwc_v2, "application/json"),
                                      Request(npy_bytes(images(10, (1, 4, 4, 3))))])
    assert v2.status == 400 and v2.json()["error"] == v2.json()["message"] and "INT64" in v2.json()["error"]
    assert v2_late.status == 400 and v2_late.json()["error"] == v2_late.json()["message"]  # refused after decoding
    assert npy.status == 400 and set(npy.json()) == {"code", "type", "message"}  # same shape group, no `error`


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 200), flip=st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
       delta=st.integers(-20, 20))
def test_fuzz_binary_bodies_through_the_worker(plain, example_model, cut, flip, delta):
    """A mutated tritonclient body between two good requests: it gets a 200 or its own 4xx, they get their rows."""
    x = images(11, (1, 3, 16, 16))
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([tensor])
    mutated = bytearray(body[: len(body) - cut])
    if mutated:
        mutated[flip[0] % len(mutated)] = flip[1]
    first, fuzzed, last = plain.predict([Request(npy_bytes(x)), Request(bytes(mutated), "",
                                         {"Inference-Header-Content-Length": length + delta}), Request(npy_bytes(x))])
    assert fuzzed.status == 200 or 400 <= fuzzed.status < 500, (fuzzed.status, fuzzed.body[:200])
    if fuzzed.status != 200:
        assert fuzzed.json()["message"] and fuzzed.json()["error"] == fuzzed.json()["message"]
    want = expected(example_model, x)
    for resp in (first, last):
        np.testing.assert_allclose(np.asarray(resp.json()["embeddings"], np.float32), want, atol=1e-5)


def test_each_answer_echoes_its_own_request_id_and_nothing_else(example_service, example_model):
    """Client-Request-Id comes back on every answer, good or refused, each its own request's; a value that is
    no plain id (a newline could split headers, 200 characters) is not echoed."""
    image = images(10, (3, 224, 224))
    sent = [("a1", npy_bytes(image)), ("b2", b"not an array"), (None, npy_bytes(image)), ("x\r\nSet-Cookie: y", npy_bytes(image)),
            ("z" * 200, npy_bytes(image)), ("c3", npy_bytes(image))]
    responses = example_service.predict([Request(body, "application/x-npy", {"Client-Request-Id": rid} if rid else {})
                                         for rid, body in sent])
    assert [r.status for r in responses] == [200, 400, 200, 200, 200, 200]
    assert [r.headers.get("Client-Request-Id") for r in responses] == ["a1", "b2", None, None, None, "c3"]
    np.testing.assert_allclose(responses[5].json()["embeddings"], reference_embeddings(example_model, "conv1", image),
                               atol=1e-5)
