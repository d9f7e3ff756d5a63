"""Hostile and broken request bodies: every decoder answers a checked batch or a 4xx RequestError, nothing else.

Property-based (hypothesis) over decode_request (raw bytes, .npy, JSON, KServe v1/v2, bodies TorchServe
already decoded) and read_npy, seeded with the cases that break naive decoders: truncated .npy, a
header claiming a huge shape over a tiny body, object/structured dtypes, pickles that would leave a
file behind, JSON nested thousands deep, numbers beyond float32, KServe v2 shapes that disagree with
their data, zero and negative dimensions. Memory is measured with tracemalloc (numpy reports its
buffers to it), so "rejected before allocation" is checked, not assumed. A few of the seeds then go
through TorchServe's own Service.predict in process, beside good requests, to check status codes and
that the worker keeps answering correctly.
"""
from __future__ import annotations

import io
import json
import pickle
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_embedder.decoded_request import ALLOWED_DTYPES
from image_embedder.errors import RequestError
from image_embedder.npy_codec import NPY_MAGIC, read_npy
from image_embedder.request_decoding import DecodedRequest, check_request_limits, decode_request
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import Request

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTENT_TYPES = ["", "application/x-npy", "application/octet-stream", "application/json", "text/plain",
                 "image/png", "application/python-pickle", "multipart/form-data"]
MAX_IMAGES, MAX_PIXELS = 1024, 32 * 3 * 512 * 512  # the settings' defaults


class LeaveFile:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def npy_header(descr, shape, fortran: bool = False, version: tuple = (1, 0)) -> bytes:
    """A .npy header as numpy writes it, for any descr and shape (valid or not)."""
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(out, header)
    else:
        np.lib.format.write_array_header_2_0(out, header)
    return out.getvalue()


def decode_checked(body, content_type: str = "") -> DecodedRequest | RequestError:
    """What the handler does per request: decode, then apply the size limits. Any other exception fails."""
    try:
        request = decode_request(body, content_type)
        check_request_limits(request, MAX_IMAGES, MAX_PIXELS)
    except RequestError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        body_json = json.loads(exc.to_json())
        assert body_json["code"] == exc.status and body_json["type"] and body_json["message"]
        return exc
    for image in request.images:  # what passes is a usable image batch
        assert isinstance(image, np.ndarray) and image.ndim == 4 and 0 not in image.shape
        assert image.dtype.type in ALLOWED_DTYPES and image.dtype.isnative
        assert np.isfinite(image.astype(np.float64)).all()
    return request


def bounded(body, content_type: str = "", budget: int | None = None) -> DecodedRequest | RequestError:
    """decode_checked under tracemalloc: peak allocation stays within a budget tied to the body's size."""
    size = len(body) if isinstance(body, (bytes, bytearray, str)) else len(json.dumps(body))
    budget = budget if budget is not None else 64 * size + (1 << 20)
    tracemalloc.start()
    try:
        result = decode_checked(body, content_type)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= budget, f"decoding {size} bytes peaked at {peak} bytes (budget {budget})"
    return result


# -- seeds, each with its expected outcome ----------------------------------------------------------

def test_truncated_npy_is_refused_at_every_cut():
    good = npy_bytes(np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4))
    assert isinstance(decode_checked(bytearray(good), "application/x-npy"), DecodedRequest)
    for cut in range(0, len(good) - 1, 7):
        result = bounded(bytearray(good[:cut]), "application/x-npy")
        assert isinstance(result, RequestError) and result.status == 400, cut


@pytest.mark.parametrize("shape", [(10**6, 10**6, 10**6), (1000, 3, 224, 224), (2**62, 3, 1, 1), (1, 3, 2**40, 2**40)])
def test_huge_npy_shape_over_tiny_body_is_refused_before_allocation(shape):
    body = bytearray(npy_header("<f4", shape) + b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as info:
            read_npy(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 400 and "promises shape" in info.value.message
    assert peak < 256 * 1024, f"refusing a {shape} claim allocated {peak} bytes"


@pytest.mark.parametrize("descr", ["|O", [("r", "<f4"), ("g", "<f4")], [("x", "<f4", (3,))], "|V0", "|V8", "|S0",
                                   "<U3", "<M8[s]", "|b1", "<c8", "<i8"])
def test_non_image_dtypes_are_refused(descr):
    itemsize = np.lib.format.descr_to_dtype(descr).itemsize
    body = bytearray(npy_header(descr, (1, 1, 2, 2)) + b"\1" * (4 * itemsize))
    result = bounded(body, "application/x-npy")
    assert isinstance(result, RequestError) and result.status == 400
    assert result.kind == "UnsupportedDtype", (result.kind, result.message)


def test_big_endian_npy_is_read_as_its_values():
    image = np.random.default_rng(1).random((1, 3, 4, 4)).astype(">f4")
    result = decode_checked(bytearray(npy_bytes(image)), "application/x-npy")
    assert isinstance(result, DecodedRequest)
    np.testing.assert_array_equal(result.images[0], image.astype("<f4"))


def test_pickled_payloads_are_never_unpickled(tmp_path):
    evidence = tmp_path / "unpickled.txt"
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps(LeaveFile(str(control))))  # the payload is live: unpickling does leave a file
    assert control.exists()
    payload = pickle.dumps(LeaveFile(str(evidence)))
    objects = np.empty((1, 1, 1, 1), dtype=object)
    objects[0, 0, 0, 0] = LeaveFile(str(evidence))
    bodies = [npy_bytes(objects, allow_pickle=True), payload, NPY_MAGIC + b"\x01\x00" + payload, pickle.dumps([[[[LeaveFile(str(evidence))]]]])]
    for body in bodies:
        for content_type in ("application/x-npy", "application/octet-stream", "application/python-pickle", ""):
            result = decode_checked(bytearray(body), content_type)
            assert isinstance(result, RequestError) and result.status in (400, 415), result
    assert not evidence.exists(), "a request body was unpickled"


def _nested(depth: int, leaf=1.0):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [40, 1000, 5000, 100_000])
def test_json_nested_thousands_deep(depth):
    raw = b'{"data": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    result = bounded(bytearray(raw), "application/json")
    assert isinstance(result, RequestError) and result.status == 400
    if depth <= 5000:  # a body TorchServe's worker did manage to decode itself
        result = decode_checked({"data": _nested(depth)}, "application/json")
        assert isinstance(result, RequestError) and result.status == 400


@pytest.mark.parametrize("number", ["1e39", "-3.5e38", "1e400", "9" * 400, "-" + "9" * 40, "NaN", "Infinity"])
def test_json_numbers_beyond_float32(number):
    image = "[[[" + ", ".join(["0.5", number]) + "]]]"
    for raw in (f'{{"data": {image}}}', f'{{"instances": [{image}]}}',
                f'{{"inputs": [{{"name": "x", "shape": [1, 1, 1, 2], "datatype": "FP32", "data": [0.5, {number}]}}]}}'):
        result = decode_checked(bytearray(raw.encode()), "application/json")
        assert isinstance(result, RequestError) and result.status == 400, (raw[:80], result)
        assert result.kind in ("NonFiniteValues", "InvalidJson"), result.kind


@pytest.mark.parametrize("shape, count", [([1, 3, 2, 2], 11), ([1, 3, 2, 2], 13), ([1, 3, 2, 2], 0),
                                          ([10**9, 3, 224, 224], 12), ([2**63, 2**63], 4), ([], 1)])
def test_kserve_v2_shape_disagreeing_with_data(shape, count):
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [0.25] * count}]}
    for form in (body, bytearray(json.dumps(body).encode())):
        result = bounded(form, "application/json")
        assert isinstance(result, RequestError) and result.status == 400, result


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 0, 4, 4), (1, 3, 0, 4), (3, 0, 4)])
def test_zero_dimensions(shape):
    result = decode_checked(bytearray(npy_bytes(np.zeros(shape, np.float32))), "application/x-npy")
    assert isinstance(result, RequestError) and result.status == 400 and "empty" in result.message
    v2 = {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32", "data": []}]}
    result = decode_checked(v2, "application/json")
    assert isinstance(result, RequestError) and result.status == 400


@pytest.mark.parametrize("shape", [(-1, 3, 4, 4), (1, -3, 4, 4), (1, 3, 4, -4)])
def test_negative_dimensions(shape):
    body = bytearray(npy_header("<f4", shape) + b"\0" * 256)
    result = bounded(body, "application/x-npy")
    assert isinstance(result, RequestError) and result.status == 400
    v2 = {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32", "data": [0.0] * 48}]}
    result = decode_checked(v2, "application/json")
    assert isinstance(result, RequestError) and result.status == 400 and "negative" in result.message


# -- properties ---------------------------------------------------------------------------------------

@FUZZ
@given(body=st.binary(max_size=3000), content_type=st.sampled_from(CONTENT_TYPES),
       prefix=st.sampled_from([b"", NPY_MAGIC, NPY_MAGIC + b"\x01\x00", NPY_MAGIC + b"\x02\x00", b"{", b"[",
                               b'{"data": ', b'{"inputs": ', b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
def test_fuzz_arbitrary_bytes(body, content_type, prefix):
    bounded(bytearray(prefix + body), content_type)


DESCRS = st.sampled_from(["<f4", ">f4", "<f2", "<f8", "|u1", "<i4", "|O", "|V0", "|V8", "|S0", "<U2", "<M8[s]", "|b1",
                          "<c8", [("a", "<f4")], [("a", "|O")]])
DIMS = st.integers(min_value=-3, max_value=6) | st.integers(min_value=-(2**63), max_value=2**63)


@FUZZ
@given(descr=DESCRS, shape=st.lists(DIMS, max_size=6).map(tuple), fortran=st.booleans(),
       version=st.sampled_from([(1, 0), (2, 0)]), tail=st.binary(max_size=600), pad=st.integers(0, 2000))
def test_fuzz_npy_headers(descr, shape, fortran, version, tail, pad):
    try:
        header = npy_header(descr, shape, fortran, version)
    except (ValueError, TypeError, OverflowError):
        return  # numpy itself will not write this header
    body = bytearray(header + tail + b"\x01" * pad)
    bounded(body, "application/x-npy")
    bounded(body, "")


@FUZZ
@given(image=st.builds(lambda n, c, h, w, dt, seed: np.random.default_rng(seed).integers(0, 255, (n, c, h, w)).astype(dt),
                       st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6),
                       st.sampled_from(["<f4", ">f4", "<f2", "<f8", "|u1", ">f8"]), st.integers(0, 2**16)),
       cut=st.integers(0, 400), flip=st.tuples(st.integers(0, 200), st.integers(0, 255)))
def test_fuzz_mutated_valid_npy(image, cut, flip):
    body = bytearray(npy_bytes(image))
    result = decode_checked(bytearray(body), "application/x-npy")
    assert isinstance(result, DecodedRequest)
    np.testing.assert_array_equal(result.images[0].astype(np.float64), image.astype(np.float64))
    bounded(bytearray(body[: max(0, len(body) - 1 - cut)]), "application/x-npy")  # truncated
    index, value = flip
    mutated = bytearray(body)
    mutated[index % len(mutated)] = value
    bounded(mutated, "application/x-npy")  # one byte changed anywhere, header included


NUMBERS = (st.floats(allow_nan=True, allow_infinity=True, width=64) | st.integers(-(10**40), 10**40)
           | st.sampled_from([1e39, -1e39, 3.5e38, 1e-50, 0]))
JSON_VALUES = st.recursive(NUMBERS | st.booleans() | st.none() | st.text(max_size=3),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3),
                           max_leaves=60)


def _kserve_v2(shape, datatype, data, name):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@FUZZ
@given(value=JSON_VALUES,
       wrapper=st.sampled_from(["data", "instances", "v2", "bare", "v2-flat"]),
       shape=st.lists(st.integers(-2, 4) | st.integers(-(2**63), 2**63), max_size=5),
       datatype=st.sampled_from(["FP32", "FP16", "UINT8", "INT64", "BYTES", "BOOL", 7, None]),
       as_bytes=st.booleans())
def test_fuzz_json_bodies(value, wrapper, shape, datatype, as_bytes):
    if wrapper == "data":
        body = {"data": value}
    elif wrapper == "instances":
        body = {"instances": value}
    elif wrapper == "v2":
        body = _kserve_v2(shape, datatype, value, "x")
    elif wrapper == "v2-flat":
        body = _kserve_v2(shape, datatype, [0.5] * max(0, min(64, int(np.prod(np.clip(shape, -2, 4))) if shape else 1)), "x")
    else:
        body = value
    if as_bytes:
        raw = json.dumps(body).encode()  # NaN/Infinity pass through as Python's json writes them
        bounded(bytearray(raw), "application/json")
    elif isinstance(body, (dict, list)):
        bounded(body, "application/json")


@FUZZ
@given(images=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
       data=st.data())
def test_fuzz_valid_json_decodes_to_the_numbers_sent(images, data):
    c, h, w = images[0]
    n = len(images)
    values = data.draw(st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=n * c * h * w, max_size=n * c * h * w))
    array = np.asarray(values, np.float32).reshape(n, c, h, w)
    for body in ({"data": array.tolist()}, {"instances": array.tolist()},
                 _kserve_v2([n, c, h, w], "FP32", array.ravel().tolist(), "x")):
        result = decode_checked(bytearray(json.dumps(body).encode()), "application/json")
        assert isinstance(result, DecodedRequest), result
        np.testing.assert_array_equal(result.images[0], array)


# -- through TorchServe's own worker code, in process --------------------------------------------------

def hostile_requests(tmp_path) -> list[Request]:
    evidence = tmp_path / "unpickled-in-handler.txt"
    objects = np.empty((1, 1, 1, 1), dtype=object)
    objects[0, 0, 0, 0] = LeaveFile(str(evidence))
    pickled_npy = npy_bytes(objects, allow_pickle=True)
    deep = b'{"data": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"
    return [
        Request(npy_bytes(np.zeros((2, 3, 8, 8), np.float32))[:-5]),                      # truncated
        Request(npy_header("<f4", (10**6, 10**6, 10**6)) + b"\0" * 16),                   # huge claim
        Request(pickled_npy),                                                             # object dtype
        Request(pickle.dumps(LeaveFile(str(evidence))), "application/octet-stream"),      # raw pickle
        Request(deep, "application/json"),                                                 # nested deep
        Request(b'{"data": [[[1e39, 2]]]}', "application/json"),                           # beyond float32
        Request(json.dumps(_kserve_v2([1, 3, 4, 4], "FP32", [0.5] * 47, "x")).encode(), "application/json"),
        Request(npy_header("<f4", (1, 3, -4, 4)) + b"\0" * 192),                          # negative dim
        Request(npy_bytes(np.zeros((0, 3, 8, 8), np.float32))),                           # zero dim
        Request(npy_header([("r", "<f4"), ("g", "<f4")], (1, 1, 2, 2)) + b"\0" * 32),      # structured
    ]


def test_hostile_bodies_through_the_worker_cost_nothing_else(example_service, example_model, tmp_path):
    rng = np.random.default_rng(7)
    goods = [rng.random((3, 224, 224), dtype=np.float32) for _ in range(2)]
    bad = hostile_requests(tmp_path)
    batch = [Request(npy_bytes(goods[0]))] + bad + [Request(npy_bytes(goods[1]))]
    responses = example_service.predict(batch)
    assert len(responses) == len(batch)
    for req, resp in zip(bad, responses[1:-1]):
        assert 400 <= resp.status < 500, (req.body[:40], resp.status, resp.body[:200])
        assert resp.content_type == "application/json"
        error = resp.json()
        assert error["code"] == resp.status and error["type"] and error["message"]
    for image, resp in ((goods[0], responses[0]), (goods[1], responses[-1])):
        assert resp.status == 200, resp.body[:300]
        np.testing.assert_allclose(np.asarray(resp.json()["embeddings"], np.float32),
                                   reference_embeddings(example_model, "conv1", image), atol=1e-5)
    assert not (tmp_path / "unpickled-in-handler.txt").exists()
    # each hostile body alone, then a good one: the worker still answers correctly
    for req in bad:
        [resp] = example_service.predict([req])
        assert 400 <= resp.status < 500, (req.body[:40], resp.status)
    image = rng.random((3, 224, 224), dtype=np.float32)
    [resp] = example_service.predict([Request(npy_bytes(image))])
    assert resp.status == 200
    np.testing.assert_allclose(np.asarray(resp.json()["embeddings"], np.float32),
                               reference_embeddings(example_model, "conv1", image), atol=1e-5)


def independent_verdict(body: bytes, content_type: str) -> str:
    """What the worker must answer, decided without our decoders: numpy's own np.load (pickles off, no
    bytes left over) and json.loads (only when the Content-Type doesn't say .npy). "image" when they yield
    a finite (C,H,W)/(N,C,H,W) of a supported dtype, else "refuse"."""
    if body[:6] == NPY_MAGIC:
        stream = io.BytesIO(body)
        try:
            array = np.load(stream, allow_pickle=False)
        except Exception:
            return "refuse"
        if stream.read():
            return "refuse"
    elif content_type in ("application/x-npy", "application/octet-stream"):
        return "refuse"
    else:
        try:
            array = np.asarray(json.loads(body)["data"], dtype=np.float64)
        except Exception:
            return "refuse"
        if np.abs(array[np.isfinite(array)]).max(initial=0) > np.finfo(np.float32).max:
            return "refuse"
        array = array.astype(np.float32)
    if (array.dtype.type not in ALLOWED_DTYPES or array.ndim not in (3, 4) or 0 in array.shape
            or (array.dtype.kind == "f" and not np.isfinite(array).all())):
        return "refuse"
    return "image"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=400), prefix=st.sampled_from([b"", NPY_MAGIC + b"\x01\x00", b'{"data": ']),
       content_type=st.sampled_from(["application/x-npy", "application/json", "application/octet-stream"]))
def test_fuzz_through_the_worker(example_service, body, prefix, content_type):
    verdict = independent_verdict(prefix + body, content_type)
    [resp] = example_service.predict([Request(prefix + body, content_type)])
    if verdict == "refuse":
        assert 400 <= resp.status < 500, (prefix + body[:40], resp.status, resp.body[:200])
        assert resp.json()["code"] == resp.status
    else:  # the rare valid body: embeddings, or the model's own 422 for an image it can't take
        assert resp.status in (200, 422), (resp.status, resp.body[:200])


@pytest.mark.parametrize("body, content_type, verdict", [
    (npy_bytes(np.zeros((3, 4, 4), np.float32)), "application/x-npy", "image"),
    (npy_bytes(np.zeros((3, 4), np.float32)), "application/x-npy", "refuse"),
    (npy_bytes(np.zeros((3, 4, 4), np.float32))[:-1], "application/x-npy", "refuse"),
    (npy_bytes(np.zeros((3, 4, 4), np.float32)) + b"\0", "application/x-npy", "refuse"),
    (b'{"data": [[[1.0, 2.0]]]}', "application/json", "image"),
    (b'{"data": [[[1.0, 2.0]]]}', "application/x-npy", "refuse"),
    (b'{"data": [[[1e39]]]}', "application/json", "refuse"),
    (b'{"data": [[1, 2]', "application/json", "refuse"),
    (b'{"data": [[["a"]]]}', "application/json", "refuse"),
])
def test_independent_verdict_agrees_with_the_worker_on_known_bodies(example_service, body, content_type, verdict):
    """The oracle itself is checked on bodies whose answer is known by construction."""
    assert independent_verdict(body, content_type) == verdict
    [resp] = example_service.predict([Request(body, content_type)])
    assert (verdict == "image") == (resp.status in (200, 422)), (verdict, resp.status, resp.body[:200])
