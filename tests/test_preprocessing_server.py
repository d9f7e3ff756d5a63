"""Declared preprocessing on a real TorchServe: under each preset and a model file's IMAGE_PREPROCESSING,
a PNG, the same pixels as a uint8 `.npy` and as a float32 `.npy` give one embedding, equal to the
reference on the pixels preprocessed by hand; `describe` says what every input becomes."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import requests
import torch
import yaml

from image_embedder_testkit.bodies import encoded_image, npy_bytes
from image_embedder_testkit.imagenet import MEAN, STD
from image_embedder_testkit.model_files import example_with
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_server import TorchServe
from image_embedder_tools.build import ArchiveSpec, build_archive

pytestmark = pytest.mark.server

DECLARED = {"scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0]}  # pixels to [-1, 1]


def by_hand(pixels: np.ndarray, name: str) -> np.ndarray:
    """(N,3,H,W) uint8 pixels as each archive's model must see them, written out independently."""
    x = pixels.astype(np.float64)
    if name == "imagenet":
        x = (x / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    elif name == "unit":
        x = x / 255
    elif name == "declared":
        x = x / 127.5 - 1.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def server(example_files, tmp_path_factory):
    store = tmp_path_factory.mktemp("preprocessing_store")
    config = store / "ts.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 20}))
    common = dict(export_path=str(store), config_file=str(config))
    for preset in ("imagenet", "unit", "none"):
        build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                  "conv1", name=preset, preset=preset, **common), quiet=True)
    declaring = example_with(str(store), "declared_model", f"IMAGE_PREPROCESSING = {DECLARED!r}")
    build_archive(ArchiveSpec(declaring, example_files["class"], example_files["state_dict"], "conv1",
                              name="declared", **common), quiet=True)
    names = ("imagenet", "unit", "none", "declared")
    ts = TorchServe(str(store), ",".join(f"{n}={n}.mar" for n in names)).serve(*names, timeout=240)
    yield ts
    ts.cleanup()


@pytest.fixture(scope="module")
def conv1_only(example_model):
    return torch.nn.Sequential(OrderedDict(conv1=example_model.conv1)).eval()  # any image size


@pytest.mark.parametrize("name", ["imagenet", "unit", "none", "declared"])
def test_png_uint8_and_float_arrays_agree_with_the_hand_preprocessed_reference(server, conv1_only, name):
    pixels = np.random.default_rng(7).integers(0, 256, (1, 3, 24, 32), dtype=np.uint8)
    url = f"{server.inference_url}/predictions/{name}"
    bodies = {
        "image/png": encoded_image(pixels[0].transpose(1, 2, 0), "PNG", 0),
        "application/x-npy": npy_bytes(pixels),
        "float32 .npy": npy_bytes(pixels.astype(np.float32)),
    }
    expected = reference_embeddings(conv1_only, "conv1", by_hand(pixels, name))
    for kind, body in bodies.items():
        content_type = "application/x-npy" if kind.endswith(".npy") else kind
        r = requests.post(url, data=body, headers={**server.headers(), "Content-Type": content_type}, timeout=60)
        assert r.status_code == 200, (kind, r.text)
        got = np.asarray(r.json()["embeddings"], np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"{name}: {kind}")


@pytest.mark.parametrize("name, words", [
    ("imagenet", ["times 0.00392157 (0..1)", "minus mean [0.485, 0.456, 0.406]", "divided by std [0.229, 0.224, 0.225]"]),
    ("unit", ["times 0.00392157 (0..1)"]),
    ("none", ["pixels 0..255, no normalization"]),
    ("declared", ["times 0.00784314 (0..2)", "minus mean [1, 1, 1]"]),
])
def test_describe_lists_the_effective_preprocessing(server, name, words):
    r = requests.get(f"{server.inference_url}/predictions/{name}",
                     headers={**server.headers(), "describe": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    summary = r.json()["preprocessing"]["summary"]
    for word in words:
        assert word in summary
    assert "arrays of any dtype" in summary
