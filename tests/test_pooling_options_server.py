"""More pooling on a real TorchServe vs image_embedder_testkit.reference: several layers (concatenated in the given
order), gem with gem_p, normalize, and channel_axis -1 for a channels-last layer; describe answers."""
import numpy as np
import pytest
import requests

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.feature_server import MULTI_LAYERS, MULTI_SETTINGS
from image_embedder_testkit.reference import load_reference_model, reference_embeddings

pytestmark = pytest.mark.server


def post_npy(server, model, array, **headers):
    return requests.post(f"{server.inference_url}/predictions/{model}", data=npy_bytes(array), timeout=120,
                         headers=server.headers(**{"Content-Type": "application/x-npy", **headers}))


def test_several_layers_gem_normalize(feature_torchserve, example_model):
    images = np.random.default_rng(5).random((2, 3, 224, 224), dtype=np.float32)  # the reference runs the whole forward
    response = post_npy(feature_torchserve, "multi", images, Accept="application/x-npy")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-npy"
    got = np.load(__import__("io").BytesIO(response.content), allow_pickle=False)
    want = reference_embeddings(example_model, MULTI_LAYERS, images, "gem", gem_p=MULTI_SETTINGS["gem_p"],
                                normalize=True)
    assert got.shape == (2, 16 + 10)  # conv2 first, as listed, although conv1 runs first
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the order matters: conv1-first would be a different vector
    swapped = reference_embeddings(example_model, MULTI_LAYERS[::-1], images, "gem",
                                   gem_p=MULTI_SETTINGS["gem_p"], normalize=True)
    assert not np.allclose(got, swapped, atol=1e-3)


def test_channels_last_layer(feature_torchserve):
    files = feature_torchserve.chlast
    model = load_reference_model(files["model_file"], files["class"], files["state_dict"], files["kwargs"])
    images = np.random.default_rng(6).normal(size=(4, 3, 20, 24)).astype(np.float32)
    response = post_npy(feature_torchserve, "chlast", images)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["embeddings"], dtype=np.float32)
    want = reference_embeddings(model, "proj", images, "avg", channel_axis=-1)
    assert got.shape == (4, 5)  # proj's 5 features, averaged over H and W
    np.testing.assert_allclose(got, want, atol=1e-5)
    # averaging over the wrong axis (channels-first reading of NHWC) gives another shape entirely
    assert reference_embeddings(model, "proj", images, "avg", channel_axis=1).shape != got.shape


@pytest.mark.parametrize("model, layer, dim, pooling", [
    ("images", "conv1", 10, "avg"), ("multi", MULTI_LAYERS, 26, "gem"), ("chlast", "proj", 5, "avg")])
def test_describe(feature_torchserve, model, layer, dim, pooling):
    response = requests.get(f"{feature_torchserve.inference_url}/predictions/{model}", timeout=60,
                            headers=feature_torchserve.headers(describe="True"))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    info = response.json()
    assert info["layer_name"] == layer and info["embedding_dim"] == dim and info["pooling"] == pooling
    assert info["device"] == "cpu" and info["model_class"] in ("CustomModel", "ChannelsLast")
    assert info["normalize"] is (model == "multi")
