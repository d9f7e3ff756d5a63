"""The wire formats: .npy read/write, JSON / KServe v1 / v2 decoding, compact responses with content types."""
import io
import json
import pickle
from dataclasses import astuple

import numpy as np
import pytest

from image_embedder.errors import RequestError
from image_embedder.npy_codec import read_npy, write_npy
from image_embedder.request_decoding import DecodedRequest, decode_request, request_body
from image_embedder.response_encoding import JSON_TYPE, NPY_TYPE, encode_response, wants_npy
from image_embedder_testkit.bodies import npy_bytes

RNG = np.random.default_rng(3)
IMAGE = RNG.random((3, 4, 5), dtype=np.float32)
BATCH = RNG.random((2, 3, 4, 5), dtype=np.float32)
EMB = RNG.standard_normal((2, 3)).astype(np.float32)


def refused(body, content_type="", status=400, kind=None) -> RequestError:
    with pytest.raises(RequestError) as err:
        decode_request(body, content_type)
    assert err.value.status == status, err.value.message
    if kind:
        assert err.value.kind == kind, err.value.message
    doc = json.loads(err.value.to_json())
    assert doc.pop("error", err.value.message) == err.value.message  # a KServe v2 refusal also carries `error`
    assert doc == {"code": status, "type": err.value.kind, "message": err.value.message}
    return err.value


# -- .npy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64, ">f4"])
def test_npy_round_trip(dtype):
    array = (RNG.random((2, 3, 4)) * 200).astype(dtype)
    got = read_npy(npy_bytes(array))
    np.testing.assert_array_equal(got, array)
    np.testing.assert_array_equal(np.load(io.BytesIO(write_npy(array)), allow_pickle=False), array)


def test_npy_fortran_order():
    array = np.asfortranarray(IMAGE)
    np.testing.assert_array_equal(read_npy(npy_bytes(array)), IMAGE)


def test_npy_is_a_view_of_the_body():
    body = bytearray(npy_bytes(IMAGE))
    array = read_npy(body)
    assert np.shares_memory(array, np.frombuffer(body, np.uint8))


def test_write_npy_is_float32_when_given_float32():
    out = np.load(io.BytesIO(write_npy(EMB)))
    assert out.dtype == np.float32 and out.shape == (2, 3)


# -- decoding: good bodies ------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["application/x-npy", "application/octet-stream", ""])
def test_npy_body_one_image_becomes_a_batch(content_type):
    req = decode_request(bytearray(npy_bytes(IMAGE)), content_type)
    assert req.protocol == "npy" and len(req.images) == 1
    np.testing.assert_array_equal(req.images[0], IMAGE[None])


def test_npy_batch_and_uint8_values_kept_unscaled():
    batch = (BATCH * 255).astype(np.uint8)
    req = decode_request(npy_bytes(batch), "application/x-npy")
    assert req.images[0].dtype == np.uint8 and req.count == 2
    np.testing.assert_array_equal(req.images[0], batch)


@pytest.mark.parametrize("payload, protocol, expected", [
    ({"data": IMAGE.tolist()}, "data", IMAGE[None]),
    ({"data": BATCH.tolist()}, "data", BATCH),
    ({"instances": BATCH.tolist()}, "kserve_v1", BATCH),
    ({"instances": [IMAGE.tolist()]}, "kserve_v1", IMAGE[None]),
    ({"inputs": [{"name": "x", "shape": list(BATCH.shape), "datatype": "FP32", "data": BATCH.ravel().tolist()}]},
     "kserve_v2", BATCH),
    ({"inputs": [{"name": "x", "shape": list(IMAGE.shape), "datatype": "FP32", "data": IMAGE.tolist()}]},
     "kserve_v2", IMAGE[None]),
])
def test_json_forms(payload, protocol, expected):
    for body in (payload, json.dumps(payload).encode(), bytearray(json.dumps(payload).encode())):
        req = decode_request(body, "application/json")
        assert req.protocol == protocol
        np.testing.assert_allclose(np.concatenate(req.images), expected, rtol=0, atol=1e-7)


def test_kserve_v2_keeps_the_request_id():
    payload = {"id": "abc", "inputs": [{"name": "x", "shape": [1, 3, 4, 5], "datatype": "UINT8",
                                        "data": [1] * 60}]}
    req = decode_request(payload)
    assert req.request_id == "abc" and req.images[0].shape == (1, 3, 4, 5)


def test_json_without_content_type_is_sniffed():
    req = decode_request(json.dumps({"data": IMAGE.tolist()}).encode(), "")
    assert req.protocol == "data" and req.count == 1


def test_request_body_picks_body_or_data_or_the_only_part():
    assert request_body({"body": b"x"}) == b"x"
    assert request_body({"data": b"y"}) == b"y"
    assert request_body({"file": b"z"}) == b"z"
    assert request_body({}) is None


# -- decoding: the bad-input list --------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"", bytearray(), None, ""])
def test_empty_body(body):
    assert "empty" in refused(body, "application/x-npy", kind="EmptyBody").message


def test_undecodable_bytes():
    err = refused(b"\x00\x01garbage", "")
    assert "application/x-npy" in err.message and "application/json" in err.message


def test_bytes_labelled_npy_that_are_not_npy():
    assert "magic" in refused(b"not an npy file", "application/x-npy", kind="InvalidNpy").message


def test_truncated_npy():
    body = npy_bytes(IMAGE)[:-8]
    assert "bytes" in refused(body, "application/x-npy", kind="InvalidNpy").message


def test_object_npy_refused():
    body = npy_bytes(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert "object" in refused(body, "application/x-npy", kind="UnsupportedDtype").message


def test_pickled_body_refused():
    body = pickle.dumps(IMAGE)
    refused(body, "application/octet-stream")


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64, "<U3"])
def test_non_numeric_or_unsupported_dtype(dtype):
    array = np.zeros((3, 4, 4), dtype=dtype)
    err = refused(npy_bytes(array), "application/x-npy", kind="UnsupportedDtype")
    assert "float32" in err.message  # names the supported dtypes


@pytest.mark.parametrize("shape", [(4, 5), (1, 1, 3, 4, 5), (7,)])
def test_wrong_number_of_dimensions(shape):
    err = refused(npy_bytes(np.zeros(shape, np.float32)), "application/x-npy", kind="InvalidShape")
    assert str(shape) in err.message and "(N,C,H,W)" in err.message


def test_zero_sized_dimension():
    refused(npy_bytes(np.zeros((0, 3, 4, 4), np.float32)), "application/x-npy", kind="InvalidShape")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(bad):
    image = IMAGE.copy()
    image[1, 2, 3] = bad
    refused(npy_bytes(image), "application/x-npy", kind="NonFiniteValues")
    refused(npy_bytes(image.astype(np.float16)), "application/x-npy", kind="NonFiniteValues")


def test_json_overflow_to_inf_is_refused():
    refused({"data": [[[1e39]]]}, "application/json")


@pytest.mark.parametrize("payload", [
    {"data": [[[1, 2], [3]]]},
    {"instances": [[[1, 2]], [[1]]]},
    {"data": [[["a", "b"]]]},
    {"data": [[[None, 1]]]},
    {"data": "1,2,3"},
    {"data": {"x": 1}},
    {"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "FP32", "data": [1, 2, 3]}]},
    {"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "BYTES", "data": ["a", "b"]}]},
    {"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "INT64", "data": [1, 2]}]},
    {"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "UINT8", "data": [1, 256]}]},
    {"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "UINT8", "data": [1, 2.5]}]},
    {"inputs": []},
    {"something": 1},
    [1, 2, 3],
])
def test_ragged_or_non_numeric_json(payload):
    refused(payload, "application/json")
    refused(json.dumps(payload).encode(), "application/json")


def test_invalid_json_text():
    assert "not valid JSON" in refused(b'{"data": [1, 2', "application/json", kind="InvalidJson").message


# -- responses ------------------------------------------------------------------------------------
def test_default_response_is_compact_json():
    body, ctype, _ = astuple(encode_response(EMB, DecodedRequest([BATCH], "npy"), "encoder"))
    assert ctype == JSON_TYPE == "application/json"
    text = body.decode()
    assert " " not in text and "\n" not in text
    np.testing.assert_array_equal(np.asarray(json.loads(text)["embeddings"], np.float32), EMB)
    assert list(json.loads(text)) == ["embeddings"]


def test_single_image_still_gets_a_list_of_rows():
    body = encode_response(EMB[:1], DecodedRequest([IMAGE[None]], "data"), "encoder").body
    assert np.asarray(json.loads(body)["embeddings"]).shape == (1, 3)


def test_kserve_v1_response():
    body, ctype, _ = astuple(encode_response(EMB, DecodedRequest([BATCH], "kserve_v1"), "encoder"))
    doc = json.loads(body)
    assert ctype == JSON_TYPE and list(doc) == ["predictions"]
    np.testing.assert_array_equal(np.asarray(doc["predictions"], np.float32), EMB)


def test_kserve_v2_response():
    body, ctype, headers = astuple(encode_response(EMB, DecodedRequest([BATCH], "kserve_v2", "req-7"), "my-model"))
    doc = json.loads(body)
    assert ctype == JSON_TYPE and headers == {}
    assert doc["model_name"] == "my-model" and doc["id"] == "req-7"
    [out] = doc["outputs"]
    assert (out["name"], out["shape"], out["datatype"]) == ("embedding", [2, 3], "FP32")
    np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(2, 3), EMB)


@pytest.mark.parametrize("accept", ["application/x-npy", "text/html, application/x-npy;q=0.9", "application/npy"])
def test_npy_with_accept(accept):
    assert wants_npy(accept)
    body, ctype, _ = astuple(encode_response(EMB, DecodedRequest([BATCH], "kserve_v2", accept=accept), "encoder"))
    assert ctype == NPY_TYPE == "application/x-npy"
    out = np.load(io.BytesIO(body), allow_pickle=False)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, EMB)


@pytest.mark.parametrize("accept", [None, "", "application/json", "*/*"])
def test_json_for_other_accepts(accept):
    assert not wants_npy(accept)
    assert encode_response(EMB, DecodedRequest([BATCH], "npy", accept=accept), "encoder").content_type == JSON_TYPE
