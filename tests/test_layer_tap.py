"""LayerTap: dotted nested names, early exit that really skips the rest, clones safe from in-place ops."""
import os

import pytest
import torch

from image_embedder.layer_tap import LayerTap
from image_embedder.loading import load_model
from image_embedder_testkit.checkout import TEST_MODELS

NESTED = os.path.join(TEST_MODELS, "nested_net.py")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return load_model(NESTED, "NestedNet", None, {"width": 4})


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(7))


def conv2_of_block1(model, x):
    """layer3.1.conv2's output computed by hand, before the in-place ReLU that follows it."""
    with torch.no_grad():
        h = model.layer3[0](model.features(x))
        return model.layer3[1].conv2(model.layer3[1].relu(model.layer3[1].conv1(h)))


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("early_exit", [True, False])
def test_nested_dotted_layer(model, batch, early_exit):
    tap = LayerTap(model, ["layer3.1.conv2"], early_exit=early_exit)
    try:
        with torch.inference_mode():
            [out] = tap(batch)
    finally:
        tap.remove()
    expected = conv2_of_block1(model, batch)
    assert (expected < 0).any()  # so a ReLU'd capture could not pass
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_sequential_index_name(model, batch):
    tap = LayerTap(model, ["features.0"])
    try:
        [out] = tap(batch)
    finally:
        tap.remove()
    with torch.no_grad():
        torch.testing.assert_close(out, model.features[0](batch), rtol=0, atol=1e-6)


def test_early_exit_skips_the_later_layers(model, batch):
    later, h1 = count_calls(model.head)
    sibling, h2 = count_calls(model.layer3[1].relu)
    tap = LayerTap(model, ["layer3.0.conv2"], early_exit=True)
    try:
        tap(batch)
        assert later == [] and sibling == []
        tap.early_exit = False
        tap(batch)
        assert later == [1] and len(sibling) == 2  # the full pass does run them
    finally:
        tap.remove()
        h1.remove()
        h2.remove()


def test_inplace_relu_after_the_layer_does_not_change_the_capture(model, batch):
    """Early exit off: the block's ReLU(inplace=True) overwrites conv2's output after the hook saw it."""
    plain = {}
    h = model.layer3[1].conv2.register_forward_hook(lambda m, i, o: plain.setdefault("out", o))
    tap = LayerTap(model, ["layer3.1.conv2"], early_exit=False)
    try:
        with torch.no_grad():
            [out] = tap(batch)
    finally:
        tap.remove()
        h.remove()
    expected = conv2_of_block1(model, batch)
    assert (plain["out"] >= 0).all(), "an uncloned capture would have been ReLU'd in place"
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_several_layers_in_the_given_order(model, batch):
    tap = LayerTap(model, ["layer3.1.conv2", "features.0"], early_exit=True)
    try:
        deep, shallow = tap(batch)
    finally:
        tap.remove()
    torch.testing.assert_close(deep, conv2_of_block1(model, batch), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(shallow, model.features[0](batch), rtol=0, atol=1e-6)


def test_hooks_are_registered_once_and_reused(model, batch):
    tap = LayerTap(model, ["features.0"])
    try:
        assert len(model.features[0]._forward_hooks) == 1
        first = tap(batch)[0].clone()
        second = tap(batch * 2)[0]
        assert len(model.features[0]._forward_hooks) == 1
        assert not torch.allclose(first, second)
    finally:
        tap.remove()
    assert len(model.features[0]._forward_hooks) == 0


def test_layer_that_never_runs_is_reported(batch):
    class Skips(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Conv2d(3, 2, 1)
            self.unused = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.used(x)

    tap = LayerTap(Skips(), ["unused"])
    with pytest.raises(RuntimeError, match="unused"):
        tap(batch)


def test_the_model_still_runs_whole_outside_the_tap(model, batch):
    """The hooks stay registered, but a direct call of the model is an ordinary full forward pass."""
    with torch.no_grad():
        before = model(batch)
    tap = LayerTap(model, ["layer3.0.conv2"], early_exit=True)
    try:
        tap(batch)
        with torch.no_grad():
            torch.testing.assert_close(model(batch), before, rtol=0, atol=0)
    finally:
        tap.remove()


class _Forgiving(torch.nn.Module):
    """A model whose forward swallows any Exception from its first block (and then would go on)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.second_ran = 0

    def forward(self, x):
        try:
            x = self.first(x)
        except Exception:  # noqa: BLE001 - the point of this model
            pass
        self.second_ran += 1
        return self.second(x)


def test_early_exit_is_not_swallowed_by_a_models_except_exception():
    model = _Forgiving()
    tap = LayerTap(model, ["first"], early_exit=True)
    x = torch.randn(2, 4)
    [out] = tap(x)
    assert model.second_ran == 0
    torch.testing.assert_close(out, model.first(x))
