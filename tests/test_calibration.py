"""Archives built with --calibration (the user's images) and --whiten: int8, uint8 and binary answers
recomputed from the calibration vectors the archive carries (read from the .mar, quantized here with
the formulas of docs/api.md#output-options), whitening recomputed from the model through a forward
hook and the stored mean and projection, KServe v2 INT8/UINT8 outputs read by tritonclient, and the
refusals at build and per request."""
import io
import zipfile

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from image_embedder.errors import ConfigError
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive

NPY = "application/x-npy"


def pixels(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)


def spec(files: dict, folder, name: str, **kwargs) -> ArchiveSpec:
    return ArchiveSpec(files["model_file"], files["class"], files["state_dict"], "conv1", input_shape=[3, 224, 224],
                       name=name, export_path=str(folder), **kwargs)


def stored(archive: str) -> dict:
    with zipfile.ZipFile(archive) as z, z.open("calibration.npz") as f:
        with np.load(io.BytesIO(f.read())) as npz:
            return {k: npz[k] for k in npz.files}


def asked(service: InProcessModel, images: np.ndarray, **headers: str) -> np.ndarray:
    [resp] = service.predict([Request(npy_bytes(images), headers={"Accept": NPY, **headers})])
    assert resp.status == 200 and resp.content_type == NPY, resp.body[:300]
    return np.load(io.BytesIO(resp.body), allow_pickle=False)


def expected_quantized(x: np.ndarray, sample: np.ndarray, dtype: str, normalized: bool) -> np.ndarray:
    """The quantizers as docs/api.md states them, from the archive's calibration vectors."""
    k = x.shape[1]
    s = sample[:, :k].astype(np.float64)
    if normalized and k != sample.shape[1]:
        s /= np.linalg.norm(s, axis=1, keepdims=True)
    low, high = s.min(axis=0), s.max(axis=0)
    if dtype == "binary":
        bits = x > np.median(s, axis=0)
        padded = np.zeros((len(x), -(-k // 8) * 8), bool)
        padded[:, :k] = bits
        weights = 2 ** np.arange(7, -1, -1)
        return (padded.reshape(len(x), -1, 8) * weights).sum(axis=2).astype(np.uint8)
    step = np.where(high > low, (high - low) / 255, 1)
    q = np.clip(np.rint((x - low) / step), 0, 255)
    return (q - 128).astype(np.int8) if dtype == "int8" else q.astype(np.uint8)


@pytest.fixture(scope="module")
def calibrated(example_files, tmp_path_factory):
    """A PNG folder of 16 images, normalize on: int8/uint8/binary available."""
    folder = tmp_path_factory.mktemp("calibrated")
    images = folder / "images"
    images.mkdir()
    for i, image in enumerate(pixels(1, 16)):
        Image.fromarray(image.transpose(1, 2, 0)).save(images / f"{i:02d}.png")
    archive = build_archive(spec(example_files, folder, "calibrated", calibration=str(images),
                                 settings={"normalize": True}), quiet=True)
    return archive, InProcessModel(archive, model_name="calibrated")


@pytest.fixture(scope="module")
def whitened(example_files, tmp_path_factory):
    """48 images in one .npy, whitened 10 -> 6 dimensions, normalize on, int8 by default."""
    folder = tmp_path_factory.mktemp("whitened")
    np.save(folder / "calibration.npy", pixels(2, 48))
    archive = build_archive(spec(example_files, folder, "whitened", calibration=str(folder / "calibration.npy"),
                                 whiten=6, settings={"normalize": True, "output_dtype": "int8"}), quiet=True)
    return archive, InProcessModel(archive, model_name="whitened")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary"])
@pytest.mark.parametrize("dimensions", [None, 7])
def test_quantized_answers_follow_the_archives_calibration(calibrated, dtype, dimensions):
    archive, service = calibrated
    x = pixels(3, 4)
    k = {} if dimensions is None else {"Embedding-Dimensions": str(dimensions)}
    floats = asked(service, x, **k)
    got = asked(service, x, **{"Embedding-Dtype": dtype}, **k)
    expected = expected_quantized(floats, stored(archive)["sample"], dtype, normalized=True)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    mismatched = (got.astype(int) != expected.astype(int)).sum()
    assert mismatched <= 1, (got, expected)  # a value on a rounding boundary may fall either way
    if dtype == "binary":  # packed 8 to a byte: 10 bits in 2, 7 in 1
        assert got.shape == (4, 2 if dimensions is None else 1)


def test_describe_reports_the_calibration(calibrated, whitened):
    for (_, service), images, whiten, dtypes in ((calibrated, 16, None, 5), (whitened, 48, 6, 5)):
        [resp] = service.predict([Request(b"", headers={"describe": "true"})])
        output = resp.json()["output"]
        assert output["calibration"]["images"] == images and output["calibration"]["whiten"] == whiten
        assert output["dtypes"] == ["float32", "float16", "int8", "uint8", "binary"][:dtypes]


def test_whitening_is_the_stored_projection_of_the_models_vectors(whitened, example_model):
    archive, service = whitened
    x = pixels(4, 3)
    calibration = stored(archive)
    raw = reference_embeddings(example_model, "conv1", x.astype(np.float32)).astype(np.float64)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)  # normalize: true: L2, whiten, L2
    white = (raw - calibration["whiten_mean"]) @ calibration["whiten_projection"]
    white /= np.linalg.norm(white, axis=1, keepdims=True)
    got = asked(service, x, **{"Embedding-Dtype": "float32"})
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, white, atol=1e-4)
    default = asked(service, x)  # the archive's own dtype: int8
    assert default.dtype == np.int8
    assert (default.astype(int) != expected_quantized(got, calibration["sample"], "int8", True).astype(int)).sum() <= 1


def test_whitening_decorrelates_the_calibration_images(whitened):
    archive, service = whitened
    calibration = stored(archive)
    assert calibration["sample"].shape == (48, 6) and calibration["images"] == 48
    eigenvalues = calibration["whiten_eigenvalues"]
    assert (np.diff(eigenvalues) <= 0).all()  # components by decreasing variance
    white = asked(service, pixels(2, 48), **{"Embedding-Dtype": "float32"})  # the calibration images themselves
    np.testing.assert_allclose(white, calibration["sample"], atol=1e-4)


@pytest.mark.parametrize("dtype, datatype", [("int8", "INT8"), ("uint8", "UINT8"), ("binary", "UINT8")])
def test_tritonclient_reads_quantized_outputs(calibrated, dtype, datatype):
    _, service = calibrated
    x = pixels(5, 2).astype(np.float32)
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton.InferRequestedOutput("embedding", binary_data=True)],
        parameters={"embedding_dtype": dtype})
    [resp] = service.predict([Request(body, "application/octet-stream", {"Inference-Header-Content-Length": str(length)})])
    assert resp.status == 200, resp.body[:300]
    result = triton.InferResult.from_response_body(
        resp.body, header_length=int(resp.headers["Inference-Header-Content-Length"]))
    assert result.get_output("embedding")["datatype"] == datatype
    np.testing.assert_array_equal(result.as_numpy("embedding"), asked(service, x, **{"Embedding-Dtype": dtype}))


def test_quantized_dtypes_need_a_calibration(example_service, example_files, tmp_path):
    [resp] = example_service.predict([Request(npy_bytes(pixels(6, 1)), headers={"Embedding-Dtype": "int8"})])
    assert resp.status == 400 and resp.json()["type"] == "InvalidOutputOption"
    assert "--calibration" in resp.json()["message"] and "float32, float16" in resp.json()["message"]
    with pytest.raises(ConfigError, match="--calibration"):
        build_archive(spec(example_files, tmp_path, "nocal", settings={"output_dtype": "binary"}), quiet=True)
    with pytest.raises(ConfigError, match="--calibration"):
        build_archive(spec(example_files, tmp_path, "nocal", whiten=4), quiet=True)


def test_whitening_more_dimensions_than_the_layer_or_images_is_refused(example_files, tmp_path):
    np.save(tmp_path / "few.npy", pixels(7, 5))
    with pytest.raises(ConfigError, match="1..10"):
        build_archive(spec(example_files, tmp_path, "wide", calibration=str(tmp_path / "few.npy"), whiten=11), quiet=True)
    with pytest.raises(ConfigError, match="more than 6 calibration images, got 5"):
        build_archive(spec(example_files, tmp_path, "few", calibration=str(tmp_path / "few.npy"), whiten=6), quiet=True)


def test_json_and_openai_bodies_carry_quantized_vectors(calibrated):
    import base64
    import json

    _, service = calibrated
    x = pixels(8, 2)
    url = "data:application/x-npy;base64," + base64.b64encode(npy_bytes(x[0])).decode()
    data, openai_float, openai_b64 = service.predict([
        Request(json.dumps({"data": x.tolist(), "embedding_dtype": "binary", "dimensions": 9}).encode(),
                "application/json"),
        Request(json.dumps({"input": [url], "encoding_format": "float"}).encode(), "application/json",
                {"Embedding-Dtype": "int8"}),
        Request(json.dumps({"input": [url], "encoding_format": "base64"}).encode(), "application/json",
                {"Embedding-Dtype": "int8"}),
    ])
    np.testing.assert_array_equal(np.asarray(data.json()["embeddings"], np.uint8),
                                  asked(service, x, **{"Embedding-Dtype": "binary", "Embedding-Dimensions": "9"}))
    int8 = asked(service, x[:1], **{"Embedding-Dtype": "int8"})
    np.testing.assert_array_equal(np.asarray([openai_float.json()["data"][0]["embedding"]], np.int8), int8)
    raw = base64.b64decode(openai_b64.json()["data"][0]["embedding"])
    np.testing.assert_array_equal(np.frombuffer(raw, np.int8)[None], int8)


def test_whiten_power_zero_is_the_pca_rotation(example_files, tmp_path):
    np.save(tmp_path / "calibration.npy", pixels(9, 24))
    archive = build_archive(spec(example_files, tmp_path, "rotated", calibration=str(tmp_path / "calibration.npy"),
                                 whiten=5, whiten_power=0.0), quiet=True)
    projection = stored(archive)["whiten_projection"].astype(np.float64)
    np.testing.assert_allclose(projection.T @ projection, np.eye(5), atol=1e-5)  # orthonormal: nothing scaled
    assert float(stored(archive)["whiten_power"]) == 0.0
