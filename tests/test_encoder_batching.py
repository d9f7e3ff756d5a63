"""ImageEncoder.embed_requests: images of one shape share forward passes across requests, passes hold at
most default_batch_size images, each request gets exactly its own rows, a rejected shape fails only its requests."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from image_embedder.encoder import ImageEncoder
from image_embedder.errors import RequestError
from image_embedder.settings import EncoderSettings
from image_embedder_testkit.checkout import TEST_MODELS
from image_embedder_testkit.reference import load_reference_model, reference_embeddings

LAYER = "layer3.1.conv2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nested")
    shutil.copy(os.path.join(TEST_MODELS, "nested_net.py"), folder / "nested_net.py")
    subprocess.run([sys.executable, str(folder / "nested_net.py"), str(folder / "w.pth")], check=True)
    return folder


def make_encoder(model_dir, **extra):
    raw = {"model_definition_file": "nested_net.py", "model_class_name": "NestedNet",
           "model_state_dict_path": "w.pth", "layer_name": LAYER, **extra}
    return ImageEncoder(EncoderSettings.from_mapping(raw), str(model_dir))


@pytest.fixture(scope="module")
def reference(model_dir):
    return load_reference_model(str(model_dir / "nested_net.py"), "NestedNet", str(model_dir / "w.pth"))


class PassCounter:
    """Records the batch size of every forward pass through the model's first layer."""

    def __init__(self, encoder):
        self.sizes = []
        self.handle = encoder.model.features[0].register_forward_hook(lambda m, i, o: self.sizes.append(len(i[0])))

    def __enter__(self):
        return self.sizes

    def __exit__(self, *exc):
        self.handle.remove()


def images(seed, n, size=8, dtype=np.float32):
    array = np.random.default_rng(seed).random((n, 3, size, size)) * 4 - 2
    return array.astype(dtype)


def test_embed_single_image_and_batch(model_dir, reference):
    enc = make_encoder(model_dir)
    one, batch = images(1, 1)[0], images(2, 5)
    np.testing.assert_allclose(enc.embed(one), reference_embeddings(reference, LAYER, one), atol=1e-5)
    np.testing.assert_allclose(enc.embed(batch), reference_embeddings(reference, LAYER, batch), atol=1e-5)


def test_same_shape_requests_share_passes_and_get_their_own_rows(model_dir, reference):
    enc = make_encoder(model_dir, default_batch_size=4)
    requests = [[images(10 + i, n)] for i, n in enumerate([1, 3, 2, 1, 2])]  # 9 images of one shape
    with PassCounter(enc) as passes:
        results = enc.embed_requests(requests)
    assert passes == [4, 4, 1]
    for (arrays,), result in zip(requests, results):
        assert result.shape == (len(arrays), 6)
        np.testing.assert_allclose(result, reference_embeddings(reference, LAYER, arrays), atol=1e-5)


def test_a_request_bigger_than_default_batch_size_is_split(model_dir, reference):
    enc = make_encoder(model_dir, default_batch_size=3)
    big = images(20, 8)
    with PassCounter(enc) as passes:
        [result] = enc.embed_requests([[big]])
    assert passes == [3, 3, 2]
    np.testing.assert_allclose(result, reference_embeddings(reference, LAYER, big), atol=1e-5)


def test_different_shapes_run_as_separate_groups(model_dir, reference):
    enc = make_encoder(model_dir)
    small_a, large, small_b = images(30, 2, 8), images(31, 1, 12), images(32, 3, 8)
    with PassCounter(enc) as passes:
        results = enc.embed_requests([[small_a], [large], [small_b]])
    assert sorted(passes) == [1, 5]
    for arrays, result in zip([small_a, large, small_b], results):
        np.testing.assert_allclose(result, reference_embeddings(reference, LAYER, arrays), atol=1e-5)


def test_one_request_with_mixed_shapes_keeps_its_order(model_dir, reference):
    enc = make_encoder(model_dir)
    a, b = images(40, 2, 8), images(41, 1, 10)
    [result] = enc.embed_requests([[a, b]])
    expected = np.concatenate([reference_embeddings(reference, LAYER, a), reference_embeddings(reference, LAYER, b)])
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_uint8_and_float64_inputs_are_used_unscaled(model_dir, reference):
    enc = make_encoder(model_dir)
    pixels = (np.random.default_rng(5).random((2, 3, 8, 8)) * 255).astype(np.uint8)
    doubles = images(6, 2).astype(np.float64)
    results = enc.embed_requests([[pixels], [doubles]])
    np.testing.assert_allclose(results[0], reference_embeddings(reference, LAYER, pixels.astype(np.float32)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(results[1], reference_embeddings(reference, LAYER, doubles), atol=1e-5)


def test_caller_arrays_are_not_modified(model_dir):
    enc = make_encoder(model_dir)
    batch = images(7, 3)
    before = batch.copy()
    enc.embed_requests([[batch]])
    enc.embed(batch)
    np.testing.assert_array_equal(batch, before)


def test_a_shape_the_model_rejects_fails_only_its_requests(model_dir, reference):
    enc = make_encoder(model_dir)
    good, wrong_channels = images(50, 2), np.zeros((1, 4, 8, 8), np.float32)
    results = enc.embed_requests([[good], [wrong_channels], [good[:1]]])
    err = results[1]
    assert isinstance(err, RequestError) and err.status == 422 and err.kind == "ModelRejectedInput"
    assert "(4, 8, 8)" in err.message and "channels" in err.message  # torch's own message is kept
    np.testing.assert_allclose(results[0], reference_embeddings(reference, LAYER, good), atol=1e-5)
    np.testing.assert_allclose(results[2], reference_embeddings(reference, LAYER, good[:1]), atol=1e-5)
    # and the encoder still works afterwards
    np.testing.assert_allclose(enc.embed(good), reference_embeddings(reference, LAYER, good), atol=1e-5)


def test_a_request_split_across_shapes_fails_whole_when_one_shape_is_rejected(model_dir):
    enc = make_encoder(model_dir)
    results = enc.embed_requests([[images(1, 1), np.zeros((1, 2, 8, 8), np.float32)], [images(2, 1)]])
    assert isinstance(results[0], RequestError) and results[0].status == 422
    assert isinstance(results[1], np.ndarray) and results[1].shape == (1, 6)


def test_early_exit_off_gives_the_same_embeddings(model_dir, reference):
    batch = images(60, 3)
    on, off = make_encoder(model_dir), make_encoder(model_dir, early_exit=False)
    np.testing.assert_allclose(off.embed(batch), on.embed(batch), atol=1e-6)
    np.testing.assert_allclose(off.embed(batch), reference_embeddings(reference, LAYER, batch), atol=1e-5)


def test_embedding_dim_from_input_shape(model_dir):
    assert make_encoder(model_dir, input_shape=[3, 8, 8]).embedding_dim == 6
    assert make_encoder(model_dir, layer_name="head", input_shape=[3, 8, 8]).embedding_dim == 5
    assert make_encoder(model_dir).embedding_dim is None


def test_device_is_cpu_here(model_dir):
    enc = make_encoder(model_dir)
    assert enc.device == torch.device("cpu") and enc.describe()["device"] == "cpu"
