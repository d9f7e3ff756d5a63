"""Output options (dtype, dimensions) in every wire format that carries them, in process: the served
float32 against the model through a forward hook, float16 as that float32 rounded to half, the first k
dimensions renormalized when the archive normalizes, archive defaults, and each bad value a 400 of its
own request naming the valid ones. tritonclient reads an FP16 output (binary and JSON)."""
import base64
import io
import json

import numpy as np
import pytest
import tritonclient.http as triton

from image_embedder.output_options import OutputOptions, shape_output
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive

NPY = "application/x-npy"


def images(seed: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 224, 224), dtype=np.float32) * 255


def npy_answer(resp) -> np.ndarray:
    assert resp.status == 200 and resp.content_type == NPY, resp.body[:300]
    return np.load(io.BytesIO(resp.body), allow_pickle=False)


def json_request(doc: dict, **headers) -> Request:
    return Request(json.dumps(doc).encode(), "application/json", headers)


@pytest.fixture(scope="module")
def normalized(example_files, tmp_path_factory) -> InProcessModel:
    """The example with `normalize: true`, and archive defaults float16 / 6 dimensions."""
    store = str(tmp_path_factory.mktemp("normalized"))
    spec = dict(input_shape=[3, 224, 224], export_path=store)
    plain = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                      "conv1", name="unit", settings={"normalize": True}, **spec), quiet=True)
    small = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                      "conv1", name="small", settings={"normalize": True, "output_dtype": "float16",
                                                                       "dimensions": 6}, **spec), quiet=True)
    return InProcessModel(plain), InProcessModel(small, model_name="small")


def test_the_client_offers_the_dtypes_the_server_answers():
    from image_embedder.output_options import OUTPUT_DTYPES
    from image_embedder_client.client import OUTPUT_DTYPES as CLIENT_DTYPES

    assert CLIENT_DTYPES == OUTPUT_DTYPES  # the client installs without the engine: a copy, held here


# -- the transformation alone --------------------------------------------------------------------------
def test_shape_output_truncates_renormalizes_and_casts():
    rng = np.random.default_rng(0)
    full = rng.standard_normal((3, 10)).astype(np.float32)
    unit = full / np.sqrt((full.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    got = shape_output(unit.astype(np.float32), OutputOptions("float16", 4), normalized=True)
    assert got.dtype == np.float16 and got.shape == (3, 4)
    expected = full[:, :4] / np.sqrt((full[:, :4].astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2 ** -10)
    np.testing.assert_array_equal(shape_output(full, OutputOptions(dimensions=4), normalized=False), full[:, :4])
    assert shape_output(full, OutputOptions(), normalized=False) is full  # nothing asked: no copy


# -- every wire format ---------------------------------------------------------------------------------
def test_each_format_carries_float16_and_dimensions(example_service, example_model):
    x = images(1)
    reference = reference_embeddings(example_model, "conv1", x)
    v2 = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
          "parameters": {"embedding_dtype": "float16", "dimensions": 4}}
    responses = example_service.predict([
        Request(npy_bytes(x), headers={"Accept": NPY}),  # float32, all 10: the baseline
        Request(npy_bytes(x), headers={"Accept": NPY, "Embedding-Dtype": "float16", "Embedding-Dimensions": "4"}),
        json_request({"data": x.tolist(), "embedding_dtype": "float16", "dimensions": 4}),
        json_request({"instances": x.tolist()}, **{"Embedding-Dtype": "float16", "Embedding-Dimensions": "4"}),
        json_request(v2),
        json_request({"input": ["data:application/x-npy;base64," + base64.b64encode(npy_bytes(x[0])).decode()],
                      "dimensions": 4, "encoding_format": "base64"}, **{"Embedding-Dtype": "float16"}),
        json_request({"data": x.tolist(), "dimensions": 3}, **{"Embedding-Dimensions": "5"}),  # the body wins
    ])
    full = npy_answer(responses[0])
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, reference, atol=1e-4)
    expected = full[:, :4].astype(np.float16)
    got = npy_answer(responses[1])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(responses[2].json()["embeddings"], np.float16), expected)
    np.testing.assert_array_equal(np.asarray(responses[3].json()["predictions"], np.float16), expected)
    [out] = responses[4].json()["outputs"]
    assert out["datatype"] == "FP16" and out["shape"] == [2, 4]
    np.testing.assert_array_equal(np.asarray(out["data"], np.float16).reshape(2, 4), expected)
    [item] = responses[5].json()["data"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(item["embedding"]), "<f2"), expected[0])
    np.testing.assert_array_equal(np.asarray(responses[6].json()["embeddings"], np.float32), full[:, :3])


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_an_fp16_output(example_service, binary):
    x = images(2)
    pixels = triton.InferInput("pixels", list(x.shape), "FP32")
    pixels.set_data_from_numpy(x, binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body(
        [pixels], outputs=[triton.InferRequestedOutput("embedding", binary_data=binary)],
        parameters={"embedding_dtype": "float16", "dimensions": 5})
    [full, resp] = example_service.predict([Request(npy_bytes(x), headers={"Accept": NPY}),
                                            Request(body, "application/octet-stream",
                                                    {"Inference-Header-Content-Length": str(length)})])
    assert resp.status == 200, resp.body[:300]
    header = resp.headers.get("Inference-Header-Content-Length")
    result = triton.InferResult.from_response_body(resp.body, header_length=None if header is None else int(header))
    got = result.as_numpy("embedding")
    assert got.dtype == np.float16 and got.shape == (2, 5)
    np.testing.assert_array_equal(got, npy_answer(full)[:, :5].astype(np.float16))


def test_dimensions_are_renormalized_when_the_archive_normalizes(normalized, example_model):
    unit, _ = normalized
    x = images(3)
    [resp] = unit.predict([Request(npy_bytes(x), headers={"Accept": NPY, "Embedding-Dimensions": "4"})])
    reference = reference_embeddings(example_model, "conv1", x)[:, :4]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    got = npy_answer(resp)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_archive_defaults_apply_unless_a_request_asks(normalized, example_model):
    _, small = normalized
    x = images(4)
    default, asked = small.predict([Request(npy_bytes(x), headers={"Accept": NPY}),
                                    Request(npy_bytes(x), headers={"Accept": NPY, "Embedding-Dtype": "float32",
                                                                   "Embedding-Dimensions": "10"})])
    full = reference_embeddings(example_model, "conv1", x)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    np.testing.assert_allclose(npy_answer(asked), full, atol=1e-5)
    six = npy_answer(default)
    assert six.dtype == np.float16 and six.shape == (2, 6)
    np.testing.assert_allclose(six, full[:, :6] / np.linalg.norm(full[:, :6], axis=1, keepdims=True), atol=2e-3)
    [describe] = small.predict([Request(b"", headers={"describe": "true"})])
    assert describe.json()["output"] == {"dtype": "float16", "dimensions": 6, "dtypes": ["float32", "float16"],
                                         "calibration": None}


def test_dimensions_beyond_the_archive_are_refused_at_build(example_files, tmp_path):
    from image_embedder.errors import ConfigError

    with pytest.raises(ConfigError, match="at most 10"):
        build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                  "conv1", input_shape=[3, 224, 224], export_path=str(tmp_path),
                                  settings={"dimensions": 11}), quiet=True)


@pytest.mark.parametrize("request_, words", [
    (Request(npy_bytes(images(5)), headers={"Embedding-Dtype": "int4"}), ["Embedding-Dtype", "'int4'", "float16"]),
    (Request(npy_bytes(images(5)), headers={"Embedding-Dimensions": "0"}), ["Embedding-Dimensions", "positive"]),
    (Request(npy_bytes(images(5)), headers={"Embedding-Dimensions": "11"}), ["dimensions 11", "at most 10"]),
    (json_request({"data": images(5).tolist(), "embedding_dtype": 16}), ["embedding_dtype", "float32, float16"]),
    (json_request({"data": images(5).tolist(), "dimensions": "four"}), ["dimensions", "'four'"]),
])
def test_bad_options_cost_only_their_own_request(example_service, request_, words):
    good = Request(npy_bytes(images(6)), headers={"Accept": NPY})
    bad, answered = example_service.predict([request_, good])
    assert bad.status == 400 and bad.json()["type"] == "InvalidOutputOption", bad.body[:300]
    for word in words:
        assert word in bad.json()["message"], bad.json()
    assert npy_answer(answered).shape == (2, 10)


def test_a_v2_refusal_of_an_option_is_in_v2_form(example_service):
    x = images(7)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "parameters": {"dimensions": 99}}
    [resp] = example_service.predict([json_request(body)])
    assert resp.status == 400 and resp.json()["error"] == resp.json()["message"] and "at most 10" in resp.json()["error"]
