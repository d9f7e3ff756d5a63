"""The handler inside TorchServe's own Service.predict: per-request status codes, content types and
bodies, embeddings checked against image_embedder_testkit.reference, for the example and small archives of
nested layers, every pooling, 2-D and token outputs, a factory with kwargs and a sibling import."""
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import TEST_MODELS
from image_embedder_testkit.reference import load_reference_model, reference_embeddings
from image_embedder_testkit.ts_inprocess import GrpcRequest, InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive

SIZE = 16  # every test image is (3, 16, 16) unless it says otherwise
# name: model file, class, kwargs, layer, pooling, extra build flags
ARCHIVES = {
    "nested_avg": ("nested_net.py", "NestedNet", {}, "layer3.1.conv2", "avg", {"batch_size": 4}),
    "nested_max": ("nested_net.py", "NestedNet", {}, "layer3.1.conv2", "max", {}),
    "nested_gem": ("nested_net.py", "NestedNet", {}, "layer3.1.conv2", "gem", {}),
    "nested_none": ("nested_net.py", "NestedNet", {}, "features.0", "none", {}),
    "nested_head_2d": ("nested_net.py", "NestedNet", {}, "head", "avg", {}),
    "tokens_cls": ("token_net.py", "TokenNet", {}, "blocks.0", "cls", {}),
    "tokens_avg": ("token_net.py", "TokenNet", {}, "blocks.2", "avg", {}),
    "factory": ("factory_net.py", "make_net", {"channels": 5, "depth": 2}, "features.2", "avg", {}),
    "sibling": ("sibling_user.py", "SiblingNet", {}, "stem.conv", "max",
                {"extra_files": ["sibling_parts_xq7.py"]}),
}


class Served:
    """An archive loaded in process plus the independent reference for what it serves."""

    def __init__(self, service, reference, layer, pooling):
        self.service, self.reference, self.layer, self.pooling = service, reference, layer, pooling

    @property
    def handler(self):
        return self.service.handler

    def expected(self, images):
        return reference_embeddings(self.reference, self.layer, images, self.pooling)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_models")
    store = tmp_path_factory.mktemp("inprocess_store")
    for name in ("nested_net.py", "token_net.py", "factory_net.py", "sibling_user.py", "sibling_parts_xq7.py"):
        shutil.copy(os.path.join(TEST_MODELS, name), folder / name)
    out = {}
    for i, (name, (model_file, cls, kwargs, layer, pooling, extra)) in enumerate(ARCHIVES.items()):
        path = str(folder / model_file)
        torch.manual_seed(100 + i)
        weights = str(folder / f"{name}.pth")
        torch.save(load_reference_model(path, cls, None, kwargs).state_dict(), weights)
        extra = dict(extra)
        extra["extra_files"] = [str(folder / f) for f in extra.get("extra_files", [])]
        mar = build_archive(ArchiveSpec(path, cls, weights, layer, pooling=pooling, model_kwargs=kwargs, name=name,
                                        export_path=str(store), input_shape=[3, SIZE, SIZE], **extra), quiet=True)
        sys.modules.pop("sibling_parts_xq7", None)  # the archive must bring its own copy
        service = InProcessModel(mar, model_name=name)
        if name == "sibling":
            shipped = os.path.dirname(sys.modules["sibling_parts_xq7"].__file__)
            assert shipped == service.model_dir, f"sibling imported from {shipped}, not the archive"
        out[name] = Served(service, load_reference_model(path, cls, weights, kwargs), layer, pooling)
    return out


def images(seed, n=None, size=SIZE, channels=3):
    shape = (channels, size, size) if n is None else (n, channels, size, size)
    return (np.random.default_rng(seed).random(shape, dtype=np.float32) * 2 - 1).astype(np.float32)


def json_request(payload, **headers):
    return Request(json.dumps(payload).encode(), "application/json", headers)


def embeddings_of(resp, key="embeddings"):
    assert resp.status == 200, (resp.status, resp.body[:500])
    assert resp.content_type == "application/json"
    return np.asarray(resp.json()[key], dtype=np.float32)


def assert_error(resp, status, kind=None, *words):
    assert resp.status == status, (resp.status, resp.body[:500])
    assert resp.content_type == "application/json"
    doc = resp.json()
    assert set(doc) - {"error"} == {"code", "type", "message"} and doc["code"] == status
    assert doc.get("error", doc["message"]) == doc["message"]  # KServe v2 requests also carry `error`
    if kind:
        assert doc["type"] == kind, doc
    for word in words:
        assert word in doc["message"], doc
    return doc


# -- the example ------------------------------------------------------------------------------------
def test_example_every_protocol_in_one_batch(example_service, example_model):
    one, batch = images(1, size=224), images(2, 2, size=224)
    responses = example_service.predict([
        Request(npy_bytes(one)),
        Request(npy_bytes(batch), "application/octet-stream"),
        json_request({"data": one.tolist()}),
        json_request({"instances": batch.tolist()}),
        json_request({"id": "r1", "inputs": [{"name": "x", "shape": [2, 3, 224, 224], "datatype": "FP32",
                                              "data": batch.ravel().tolist()}]}),
        Request(npy_bytes(batch), headers={"Accept": "application/x-npy"}),
    ])
    ref_one, ref_batch = (reference_embeddings(example_model, "conv1", x) for x in (one, batch))
    assert ref_one.shape == (1, 10)
    np.testing.assert_allclose(embeddings_of(responses[0]), ref_one, atol=1e-5)
    np.testing.assert_allclose(embeddings_of(responses[1]), ref_batch, atol=1e-5)
    np.testing.assert_allclose(embeddings_of(responses[2]), ref_one, atol=1e-5)
    np.testing.assert_allclose(embeddings_of(responses[3], "predictions"), ref_batch, atol=1e-5)
    v2 = responses[4].json()
    assert responses[4].status == 200 and v2["model_name"] == "encoder" and v2["id"] == "r1"
    [out] = v2["outputs"]
    assert (out["name"], out["shape"], out["datatype"]) == ("embedding", [2, 10], "FP32")
    np.testing.assert_allclose(np.reshape(out["data"], (2, 10)), ref_batch, atol=1e-5)
    assert responses[5].status == 200 and responses[5].content_type == "application/x-npy"
    got = np.load(io.BytesIO(responses[5].body), allow_pickle=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref_batch, atol=1e-5)


def test_json_responses_are_compact(example_service):
    [resp] = example_service.predict([Request(npy_bytes(images(3, size=224)))])
    assert b" " not in resp.body and b"\n" not in resp.body


def test_describe_header(example_service, example_model):
    image = images(4, size=224)
    describe, embedded = example_service.predict([Request(b"", headers={"describe": "true"}), Request(npy_bytes(image))])
    assert describe.status == 200 and describe.content_type == "application/json"
    doc = describe.json()
    assert (doc["model_class"], doc["layer_name"], doc["pooling"], doc["embedding_dim"], doc["device"]) == (
        "CustomModel", "conv1", "avg", 10, "cpu")
    assert doc["input_shape"] == [3, 224, 224]
    np.testing.assert_allclose(embeddings_of(embedded), reference_embeddings(example_model, "conv1", image), atol=1e-5)


# -- bad input among good requests ------------------------------------------------------------------
def _object_npy():
    return npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True)


def _with(value):
    image = images(9)
    image[0, 1, 2] = value
    return npy_bytes(image)


BAD = [  # request, status, error type, words its message must hold
    (Request(b""), 400, "EmptyBody", ["empty"]),
    (Request(b"\x00\x01 garbage \xff", "text/plain"), 400, None, ["cannot decode"]),
    (Request(b"garbage", "application/x-npy"), 400, "InvalidNpy", [".npy"]),
    (Request(_object_npy()), 400, "UnsupportedDtype", ["object"]),
    (Request(pickle.dumps(images(9)), "application/octet-stream"), 400, "InvalidNpy", []),
    (Request(npy_bytes(np.full((3, SIZE, SIZE), "ab"))), 400, "UnsupportedDtype", ["float32"]),
    (Request(npy_bytes(np.zeros((3, SIZE, SIZE), np.int64))), 400, "UnsupportedDtype", ["int64"]),
    (Request(npy_bytes(np.zeros((SIZE, SIZE), np.float32))), 400, "InvalidShape", ["(16, 16)", "(C,H,W)"]),
    (Request(npy_bytes(np.zeros((1, 1, 3, SIZE, SIZE), np.float32))), 400, "InvalidShape", ["5 dimensions"]),
    (Request(_with(np.nan)), 400, "NonFiniteValues", ["NaN"]),
    (Request(_with(np.inf)), 400, "NonFiniteValues", ["infinity"]),
    (json_request({"data": [[[1.0, 2.0], [3.0]]]}), 400, "InvalidJson", ["rectangular"]),
    (json_request({"instances": [[["a", "b"]]]}), 400, "InvalidJson", []),
    (Request(b'{"data": [[[1, 2]', "application/json"), 400, "InvalidJson", ["not valid JSON"]),
    (json_request({"inputs": [{"name": "x", "shape": [3, 4, 4], "datatype": "FP32", "data": [1.0]}]}),
     400, "InvalidKServeV2", ["48 values"]),
    (Request(npy_bytes(images(9, channels=4))), 422, "ModelRejectedInput", ["4 channels", "(4, 16, 16)"]),
]


@pytest.mark.parametrize("position", [0, 2])
def test_every_bad_input_costs_only_its_own_request(served, position):
    """All bad requests of the issue's list in ONE batch with good ones: each bad one its 4xx, the rest 200."""
    s = served["nested_avg"]
    good = [Request(npy_bytes(images(20))), json_request({"data": images(21, 2).tolist()}),
            Request(npy_bytes(images(22, 3)))]
    batch = list(good)
    for request, *_ in BAD:
        batch.insert(position, request)
    responses = s.service.predict(batch)
    assert len(responses) == len(BAD) + len(good)
    bad_responses = responses[position: position + len(BAD)][::-1]
    good_responses = responses[:position] + responses[position + len(BAD):]
    for resp, (request, status, kind, words) in zip(bad_responses, BAD):
        assert_error(resp, status, kind, *words)
    for resp, x in zip(good_responses, [images(20), images(21, 2), images(22, 3)]):
        np.testing.assert_allclose(embeddings_of(resp), s.expected(x), atol=1e-5)
    # the worker is still fine afterwards
    [after] = s.service.predict([Request(npy_bytes(images(23)))])
    np.testing.assert_allclose(embeddings_of(after), s.expected(images(23)), atol=1e-5)


def test_too_many_images_is_413(served):
    s = served["nested_avg"]
    too_many = np.zeros((1025, 3, 2, 2), np.float32)
    bad, good = s.service.predict([Request(npy_bytes(too_many)), Request(npy_bytes(images(24)))])
    assert_error(bad, 413, "TooManyImages", "1025", "1024")
    np.testing.assert_allclose(embeddings_of(good), s.expected(images(24)), atol=1e-5)


# -- batching ---------------------------------------------------------------------------------------
class Passes:
    def __init__(self, served):
        self.sizes = []
        self.handle = served.handler.encoder.model.features[0].register_forward_hook(
            lambda m, i, o: self.sizes.append(len(i[0])))

    def __enter__(self):
        return self.sizes

    def __exit__(self, *exc):
        self.handle.remove()


def test_different_shapes_in_one_batch(served):
    s = served["nested_avg"]
    a, b, c = images(30, 2), images(31, 1, size=24), images(32, size=12)
    with Passes(s) as passes:
        responses = s.service.predict([Request(npy_bytes(a)), Request(npy_bytes(b)), Request(npy_bytes(c)),
                                       Request(npy_bytes(a[1]))])
    assert sorted(passes) == [1, 1, 3]  # one pass per shape; a and a[1] share theirs
    for resp, x in zip(responses, [a, b, c, a[1]]):
        np.testing.assert_allclose(embeddings_of(resp), s.expected(x), atol=1e-5)


def test_request_larger_than_default_batch_size_is_split(served):
    s = served["nested_avg"]  # default_batch_size 4
    big, small = images(40, 10), images(41, 3)
    with Passes(s) as passes:
        big_resp, small_resp = s.service.predict([Request(npy_bytes(big)), Request(npy_bytes(small))])
    assert passes == [4, 4, 4, 1]  # 13 images of one shape, at most 4 per forward pass
    got = embeddings_of(big_resp)
    assert got.shape == (10, 6)
    np.testing.assert_allclose(got, s.expected(big), atol=1e-5)
    np.testing.assert_allclose(embeddings_of(small_resp), s.expected(small), atol=1e-5)


def test_rows_are_not_mixed_between_requests(served):
    s = served["nested_avg"]
    inputs = [images(50 + i, n) for i, n in enumerate([1, 2, 1, 3])]
    responses = s.service.predict([Request(npy_bytes(x)) for x in inputs])
    for resp, x in zip(responses, inputs):
        np.testing.assert_allclose(embeddings_of(resp), s.expected(x), atol=1e-5)
    firsts = [embeddings_of(r)[0] for r in responses]
    assert all(not np.allclose(firsts[0], f) for f in firsts[1:])  # distinct inputs, distinct rows


# -- each archive against its reference -----------------------------------------------------------------
@pytest.mark.parametrize("name, dim", [
    ("nested_avg", 6), ("nested_max", 6), ("nested_gem", 6), ("nested_none", 6 * SIZE * SIZE),
    ("nested_head_2d", 5), ("tokens_cls", 8), ("tokens_avg", 8), ("factory", 5), ("sibling", 5),
])
def test_archive_matches_reference(served, name, dim):
    s = served[name]
    one, batch = images(60), images(61, 3)
    responses = s.service.predict([
        Request(npy_bytes(one)),
        json_request({"instances": batch.tolist()}),
        Request(npy_bytes(batch), headers={"Accept": "application/x-npy"}),
    ])
    expected_one, expected_batch = s.expected(one), s.expected(batch)
    assert expected_one.shape == (1, dim)
    np.testing.assert_allclose(embeddings_of(responses[0]), expected_one, atol=1e-5)
    np.testing.assert_allclose(embeddings_of(responses[1], "predictions"), expected_batch, atol=1e-5)
    assert responses[2].content_type == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(responses[2].body)), expected_batch, atol=1e-5)


def test_token_outputs_really_are_3d_and_2d(served):
    """Guards the meaning of the pooling tests: blocks.* give (N, T, D) tokens, head gives (N, D)."""
    seen = {}

    def record(key):
        def hook(module, inputs, output) -> None:  # a hook returning a value would replace the output
            seen[key] = tuple(output.shape)
        return hook

    tokens = served["tokens_cls"].reference
    h = tokens.blocks[0].register_forward_hook(record("tokens"))
    nested = served["nested_head_2d"].reference
    h2 = nested.head.register_forward_hook(record("head"))
    try:
        with torch.no_grad():
            tokens(torch.zeros(2, 3, SIZE, SIZE))
            nested(torch.zeros(2, 3, SIZE, SIZE))
    finally:
        h.remove()
        h2.remove()
    assert seen == {"tokens": (2, 1 + (SIZE // 4) ** 2, 8), "head": (2, 5)}


# -- TorchServe's gRPC inference API ---------------------------------------------------------------
def test_a_grpc_input_map_is_a_body_and_its_headers(example_service, example_model):
    """Over gRPC a request is its input map (no HTTP headers): `data` is the body, the other entries
    are read as the headers of their names, beside a REST request in the same batch."""
    batch = images(7, 2, size=224)
    ref = reference_embeddings(example_model, "conv1", batch)
    plain, npy16, describe, refused, rest = example_service.predict([
        GrpcRequest({"data": npy_bytes(batch)}),
        GrpcRequest({"data": npy_bytes(batch), "accept": b"application/x-npy", "embedding-dtype": b"float16",
                     "Embedding-Dimensions": b"4"}),
        GrpcRequest({"describe": b"true"}),
        GrpcRequest({"data": npy_bytes(batch), "embedding-dtype": b"float99"}),
        Request(npy_bytes(batch), headers={"Accept": "application/x-npy"}),
    ])
    np.testing.assert_allclose(embeddings_of(plain), ref, atol=1e-5)
    assert npy16.content_type == "application/x-npy"
    got = np.load(io.BytesIO(npy16.body), allow_pickle=False)
    assert got.dtype == np.float16 and got.shape == (2, 4)
    np.testing.assert_allclose(got, ref[:, :4], atol=1e-2)
    assert describe.status == 200 and describe.json()["layer_name"] == "conv1"
    assert refused.status == 400 and "float99" in refused.json()["message"], refused.body
    np.testing.assert_allclose(np.load(io.BytesIO(rest.body)), ref, atol=1e-5)
