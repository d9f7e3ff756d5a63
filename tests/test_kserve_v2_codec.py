"""The KServe v2 binary tensor extension, decoder and encoder, without a server.

Requests are built by NVIDIA's tritonclient (`InferenceServerClient.generate_request_body`, the reference
client's own encoder) and responses read back with its `InferResult.from_response_body`, so the wire format
is checked against an implementation that shares nothing with ours. Malformed bodies are written by hand
from the spec (see kserve_v2.py) and fuzzed with hypothesis: each is a 400 with a message, never a crash
or an allocation bigger than the body.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import tracemalloc

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from image_embedder.errors import RequestError
from image_embedder.image_decoding import ImageDecoder
from image_embedder.request_decoding import DecodedRequest, decode_request
from image_embedder.response_encoding import encode_response

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODER = ImageDecoder()
RNG = np.random.default_rng(90)


def triton_body(*arrays, binary=(True,), names=None, outputs=None, request_id=""):
    """(body, header length or None) as tritonclient would send these arrays."""
    inputs = []
    for i, array in enumerate(arrays):
        datatype = "BYTES" if array.dtype == object else {"uint8": "UINT8", "float16": "FP16", "float32": "FP32",
                                                          "float64": "FP64"}[array.dtype.name]
        tensor = triton.InferInput(names[i] if names else f"input{i}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary[i % len(binary)])
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id=request_id)
    return body, (None if length is None else str(length))


def decode(body, length, content_type=""):
    return decode_request(bytearray(body), content_type, DECODER, length)


def refused(body, length, *words, kind=None) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode(body, length)
    assert info.value.status == 400, info.value.message
    for word in words:
        assert word in info.value.message, info.value.message
    if kind:
        assert info.value.kind == kind
    return info.value


def png(array_hwc: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_hwc).save(out, format="PNG")
    return out.getvalue()


# -- requests tritonclient writes -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("binary", [True, False])
def test_each_datatype_is_read_as_its_own_dtype(dtype, binary):
    array = (RNG.random((2, 3, 5, 4)) * 200).astype(dtype)
    body, length = triton_body(array, binary=(binary,))
    assert (length is not None) == binary
    request = decode(body, length)
    assert request.protocol == "kserve_v2"
    [got] = request.images
    assert got.dtype == dtype  # not float32 for everything
    np.testing.assert_array_equal(got, array)


def test_mixed_binary_and_json_inputs_keep_their_order():
    a = RNG.random((1, 3, 4, 4), dtype=np.float32)
    b = (RNG.random((2, 3, 6, 6)) * 255).astype(np.uint8)
    c = RNG.random((3, 4, 4)).astype(np.float64)
    body, length = triton_body(a, b, c, binary=(True, False, True))
    got = decode(body, length).images
    assert [g.shape for g in got] == [(1, 3, 4, 4), (2, 3, 6, 6), (1, 3, 4, 4)]
    for g, want in zip(got, (a, b, c[None])):
        np.testing.assert_array_equal(g, want)


def test_bytes_input_carries_encoded_images_in_binary_and_json_form():
    pixels = [(RNG.random((5, 7, 3)) * 255).astype(np.uint8) for _ in range(2)]
    images = np.array([png(p) for p in pixels], dtype=object)
    for binary in (True, False):
        if binary:
            body, length = triton_body(images)
        else:  # JSON BYTES: base64 strings, as our docs say
            b64 = np.array([base64.b64encode(x).decode() for x in images], dtype=object)
            body, length = triton_body(b64, binary=(False,))
        got = decode(body, length).images
        assert len(got) == 2
        for g, p in zip(got, pixels):
            np.testing.assert_array_equal(g[0], p.transpose(2, 0, 1))


@pytest.mark.parametrize("outputs, binary", [
    (None, True),  # tritonclient asks binary_data_output when no outputs are named
    ([triton.InferRequestedOutput("embedding", binary_data=True)], True),
    ([triton.InferRequestedOutput("embedding", binary_data=False)], False),
])
def test_responses_tritonclient_reads_back(outputs, binary):
    array = RNG.random((2, 3, 4, 4), dtype=np.float32)
    body, length = triton_body(array, outputs=outputs, request_id="r-9")
    request = decode(body, length)
    assert request.options["binary_output"] is binary and request.request_id == "r-9"
    embeddings = RNG.standard_normal((2, 5)).astype(np.float32)
    answer = encode_response(embeddings, request, "encoder")
    header = answer.headers.get("Inference-Header-Content-Length")
    assert (header is not None) == binary
    assert answer.content_type == ("application/octet-stream" if binary else "application/json")
    result = triton.InferResult.from_response_body(answer.body, header_length=None if header is None else int(header))
    np.testing.assert_array_equal(result.as_numpy("embedding"), embeddings)
    assert result.get_response()["id"] == "r-9" and result.get_response()["model_name"] == "encoder"


def test_unknown_output_name_is_refused():
    body, length = triton_body(np.zeros((1, 3, 2, 2), np.float32), outputs=[triton.InferRequestedOutput("logits")])
    refused(body, length, "'logits'", "'embedding'")


@pytest.mark.parametrize("datatype", ["INT8", "INT64", "BOOL", "BF16", "UINT16", "FP8"])
def test_other_datatypes_are_refused_by_name(datatype):
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 2, 2], "datatype": datatype,
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    err = refused(header + b"\0" * 8, str(len(header)), datatype, "UINT8, FP16, FP32, FP64", kind="UnsupportedDtype")
    assert err.status == 400


# -- malformed binary bodies (the list) -------------------------------------------------------
def binary_request(tensors, tail: bytes):
    header = json.dumps({"inputs": tensors}).encode()
    return header + tail, str(len(header))


def fp32(shape, size):
    return {"name": "x", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": size}}


def test_header_length_beyond_the_body():
    body, _ = binary_request([fp32([1, 1, 2, 2], 16)], b"\0" * 16)
    refused(body, str(len(body) + 1), "Inference-Header-Content-Length", str(len(body)))


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "99999999999999999999"])
def test_header_length_not_a_length(length):
    body, _ = binary_request([fp32([1, 1, 2, 2], 16)], b"\0" * 16)
    refused(body, length, "Inference-Header-Content-Length")


def test_header_length_cutting_the_json():
    body, length = binary_request([fp32([1, 1, 2, 2], 16)], b"\0" * 16)
    refused(body, str(int(length) - 3), "not a JSON header")


def test_size_disagreeing_with_shape():
    body, length = binary_request([fp32([1, 1, 2, 2], 12)], b"\0" * 12)
    refused(body, length, "needs 16 bytes", "binary_data_size is 12")


def test_size_running_past_the_body():
    body, length = binary_request([fp32([1, 1, 2, 2], 16)], b"\0" * 10)
    refused(body, length, "runs past the body", "10 bytes remain")


def test_bytes_left_over_after_the_inputs():
    body, length = binary_request([fp32([1, 1, 2, 2], 16)], b"\0" * 20)
    refused(body, length, "holds 20 bytes", "add up to 16")


@pytest.mark.parametrize("size", [-16, 2**70, True, "16", 1.5])
def test_negative_huge_or_non_integer_sizes(size):
    body, length = binary_request([fp32([1, 1, 2, 2], size)], b"\0" * 16)
    refused(body, length, "binary_data_size")


def test_bytes_element_running_past_its_tensor():
    elements = struct.pack("<I", 5) + b"abcde" + struct.pack("<I", 1000) + b"xyz"
    body, length = binary_request([{"name": "img", "shape": [2], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": len(elements)}}], elements)
    refused(body, length, "element 1 claims 1000 bytes")


def test_bytes_element_without_its_length():
    elements = struct.pack("<I", 1) + b"a" + b"\x01\x00"
    body, length = binary_request([{"name": "img", "shape": [2], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": len(elements)}}], elements)
    refused(body, length, "element 1 has no 4-byte length")


def test_data_and_binary_size_together():
    tensor = dict(fp32([1, 1, 2, 2], 16), data=[0.0] * 4)
    body, length = binary_request([tensor], b"\0" * 16)
    refused(body, length, "both data and binary_data_size")


def test_binary_size_without_the_header_length():
    body, _ = binary_request([fp32([1, 1, 2, 2], 16)], b"")
    refused(body, None, "Inference-Header-Content-Length")


def test_huge_shape_over_a_tiny_body_allocates_nothing():
    body, length = binary_request([fp32([10**6, 3, 10**4, 10**4], 16)], b"\0" * 16)
    tracemalloc.start()
    try:
        refused(body, length, "needs")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


# -- fuzz ------------------------------------------------------------------------------------------
def check_outcome(body: bytes, length) -> None:
    """A decoded request of usable image batches, or a 4xx with a message; within a memory budget."""
    tracemalloc.start()
    try:
        try:
            request = decode(body, length)
        except RequestError as exc:
            assert 400 <= exc.status < 500 and exc.message, exc
            request = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 64 * len(body) + (1 << 20), (peak, len(body))
    if request is not None:
        assert isinstance(request, DecodedRequest)
        assert all(a.ndim == 4 and 0 not in a.shape for a in request.images)


SIZES = st.integers(-5, 80) | st.integers(-(2**64), 2**64) | st.sampled_from([None, True, "8", 1.0])
TENSOR = st.fixed_dictionaries({
    "name": st.text(max_size=3),
    "shape": st.lists(st.integers(-1, 4) | st.integers(2**31, 2**63), max_size=5),
    "datatype": st.sampled_from(["FP32", "FP16", "FP64", "UINT8", "BYTES", "INT32", "BOOL"]),
    "parameters": st.fixed_dictionaries({"binary_data_size": SIZES}),
})


@FUZZ
@given(tensors=st.lists(TENSOR, min_size=1, max_size=3), tail=st.binary(max_size=300),
       delta=st.integers(-40, 40) | st.just(0), ask=st.sampled_from([None, True, False]))
def test_fuzz_binary_bodies(tensors, tail, delta, ask):
    doc: dict = {"inputs": tensors}
    if ask is not None:
        doc["parameters"] = {"binary_data_output": ask}
    header = json.dumps(doc).encode()
    check_outcome(header + tail, str(len(header) + delta))


@FUZZ
@given(array=st.builds(lambda shape, dt, seed: (np.random.default_rng(seed).random(shape) * 255).astype(dt),
                       st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
                       st.sampled_from([np.uint8, np.float16, np.float32, np.float64]), st.integers(0, 2**16)),
       cut=st.integers(0, 64), flip=st.tuples(st.integers(0, 10**6), st.integers(0, 255)))
def test_fuzz_mutated_tritonclient_requests(array, cut, flip):
    body, length = triton_body(array)
    np.testing.assert_array_equal(decode(body, length).images[0], array)  # the valid request decodes exactly
    check_outcome(body[: max(0, len(body) - 1 - cut)], length)  # truncated
    index, value = flip
    mutated = bytearray(body)
    mutated[index % len(mutated)] = value
    check_outcome(bytes(mutated), length)  # one byte changed anywhere, header included


@FUZZ
@given(elements=st.lists(st.binary(max_size=20), min_size=1, max_size=4), claims=st.lists(st.integers(0, 2**32 - 1), max_size=4),
       count=st.integers(1, 5))
def test_fuzz_bytes_elements(elements, claims, count):
    raw = b"".join(struct.pack("<I", claims[i] if i < len(claims) else len(e)) + e for i, e in enumerate(elements))
    body, length = binary_request([{"name": "img", "shape": [count], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": len(raw)}}], raw)
    with pytest.raises(RequestError) as info:  # none of these bytes is a PNG or JPEG
        decode(body, length)
    assert info.value.status == 400 and info.value.message
