"""pooling.py: every method on feature maps, 2-D passthrough, 3-D tokens, each checked against numpy."""
import numpy as np
import pytest
import torch

from image_embedder.pooling import Pooling, pool, pool_layers

RNG = np.random.default_rng(11)
MAPS = RNG.standard_normal((2, 5, 4, 3)).astype(np.float32)  # (N, C, H, W)
TOKENS = RNG.standard_normal((2, 6, 4)).astype(np.float32)  # (N, T, D)
FLAT = RNG.standard_normal((3, 7)).astype(np.float32)  # (N, D)


def gem_np(x, axes, p=3.0):
    return np.mean(np.clip(x, 1e-6, None) ** p, axis=axes) ** (1 / p)


@pytest.mark.parametrize("method, expected", [
    ("avg", MAPS.mean(axis=(2, 3))),
    ("max", MAPS.max(axis=(2, 3))),
    ("gem", gem_np(MAPS, (2, 3))),
    ("none", MAPS.reshape(2, -1)),
])
def test_feature_maps(method, expected):
    out = pool(torch.from_numpy(MAPS), method)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_avg_is_adaptive_avg_pool_of_the_original():
    x = torch.from_numpy(MAPS)
    expected = torch.nn.AdaptiveAvgPool2d(1)(x).flatten(1)
    torch.testing.assert_close(pool(x, "avg"), expected)


@pytest.mark.parametrize("method, expected", [
    ("avg", TOKENS.mean(axis=1)),
    ("max", TOKENS.max(axis=1)),
    ("cls", TOKENS[:, 0]),
    ("gem", gem_np(TOKENS, (1,))),
    ("none", TOKENS.reshape(2, -1)),
])
def test_tokens(method, expected):
    out = pool(torch.from_numpy(TOKENS), method)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["avg", "max", "none", "cls", "gem"])
def test_two_d_passes_through(method):
    out = pool(torch.from_numpy(FLAT), method)
    np.testing.assert_array_equal(out.numpy(), FLAT)


def test_cls_on_feature_maps_is_refused():
    with pytest.raises(ValueError, match=r"'cls'.*\(2, 5, 4, 3\)"):
        pool(torch.from_numpy(MAPS), "cls")


def test_one_d_output_is_refused():
    with pytest.raises(ValueError, match="batch axis"):
        pool(torch.zeros(4), "avg")


def test_channels_last_axis():
    nhwc = np.ascontiguousarray(MAPS.transpose(0, 2, 3, 1))
    out = pool(torch.from_numpy(nhwc), "avg", channel_axis=-1)
    np.testing.assert_allclose(out.numpy(), MAPS.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_volumes_pool_every_spatial_axis():
    vol = RNG.standard_normal((2, 3, 2, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(pool(torch.from_numpy(vol), "max").numpy(), vol.max(axis=(2, 3, 4)), rtol=1e-6)


def test_pool_layers_concatenates_and_normalizes():
    out = pool_layers([torch.from_numpy(MAPS), torch.from_numpy(FLAT[:2])], Pooling("avg", normalize=True)).numpy()
    joined = np.concatenate([MAPS.mean(axis=(2, 3)), FLAT[:2]], axis=1)
    np.testing.assert_allclose(out, joined / np.linalg.norm(joined, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32


def test_half_precision_comes_back_as_float32():
    out = pool_layers([torch.from_numpy(MAPS).half()], Pooling("avg"))
    assert out.dtype == torch.float32
