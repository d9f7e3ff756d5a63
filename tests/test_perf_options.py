"""Speed options keep the embedding right: early exit, channels_last, bfloat16, torch.compile, uint8 + scale/mean/std.

Each option's embedding is compared with the independent reference (image_embedder_testkit.reference: the whole
forward pass with a plain hook) on a small model, so these run in seconds (compile: tens of seconds).
Tolerances: exact-math options 1e-5 (as every other embedding test); bfloat16 autocast rounds
activations to 8 mantissa bits, so it gets a relative 5e-2 and a cosine >= 0.999.
"""
from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from image_embedder.encoder import ImageEncoder
from image_embedder.layer_tap import LayerTap
from image_embedder.settings import EncoderSettings
from image_embedder_testkit import background
from image_embedder_testkit.background import Completed, Lane
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.compare import cosine_min
from image_embedder_testkit.imagenet import IMAGENET
from image_embedder_testkit.reference import load_reference_model, reference_embeddings

SMALL_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Small(nn.Module):
        """conv -> inplace ReLU -> conv -> head; `block.0` is followed by an in-place op."""
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
            self.head = nn.Linear(16, 4)
            self.after_tap_calls = 0

        def forward(self, x):
            x = self.block(x)
            self.after_tap_calls += 1
            return self.head(x.mean((2, 3)))
''')
IMAGES = np.random.default_rng(3).random((4, 3, 32, 32), dtype=np.float32)


def write_small_files(folder: str) -> dict:
    """small.py and a state_dict (BatchNorm statistics that are not the identity) in `folder`; the
    reference model loaded from them."""
    with open(os.path.join(folder, "small.py"), "w") as f:
        f.write(SMALL_MODEL)
    model = load_reference_model(os.path.join(folder, "small.py"), "Small")
    torch.manual_seed(0)
    with torch.no_grad():
        bn = model.block[3]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), os.path.join(folder, "small.pth"))
    return {"dir": folder, "model": small_reference(folder)}


def small_reference(folder: str) -> torch.nn.Module:
    return load_reference_model(os.path.join(folder, "small.py"), "Small", os.path.join(folder, "small.pth"))


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict:
    return write_small_files(str(tmp_path_factory.mktemp("small_model")))


def encoder(small_files: dict, layer: str = "block.2", **extra: object) -> ImageEncoder:
    settings = EncoderSettings.from_mapping({
        "model_definition_file": "small.py", "model_class_name": "Small", "model_state_dict_path": "small.pth",
        "layer_name": layer, **extra})
    return ImageEncoder(settings, small_files["dir"])


def test_early_exit_skips_the_rest_of_the_forward_pass(small_files):
    enc = encoder(small_files, "block.2")
    got = enc.embed(IMAGES)
    assert enc.model.after_tap_calls == 0  # nothing after the tapped layer ran
    np.testing.assert_allclose(got, reference_embeddings(small_files["model"], "block.2", IMAGES), atol=1e-5)


def test_without_early_exit_a_later_inplace_op_does_not_change_the_capture(small_files):
    # block.0's output is overwritten by the in-place ReLU that follows it: the tap must have cloned it.
    enc = encoder(small_files, "block.0", early_exit=False)
    got = enc.embed(IMAGES)
    assert enc.model.after_tap_calls == 1  # the full pass ran
    expected = reference_embeddings(small_files["model"], "block.0", IMAGES)
    assert (expected < 0).any()  # negative means survive only if the capture was cloned before the ReLU
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_channels_last_matches_float32_eager(small_files):
    got = encoder(small_files, "block.4", channels_last=True).embed(IMAGES)
    np.testing.assert_allclose(got, reference_embeddings(small_files["model"], "block.4", IMAGES), atol=1e-5)


def test_bfloat16_autocast_is_close_to_float32(small_files):
    got = encoder(small_files, "block.4", dtype="bfloat16").embed(IMAGES)
    expected = reference_embeddings(small_files["model"], "block.4", IMAGES)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 5e-2 * np.abs(expected).max()
    assert cosine_min(got, expected) >= 0.999


def test_uint8_with_scale_mean_std_equals_the_normalized_float_input(small_files):
    mean, std = IMAGENET["mean"], IMAGENET["std"]
    pixels = np.random.default_rng(4).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    got = encoder(small_files, "block.4", scale=1 / 255, mean=mean, std=std).embed(pixels)
    normalized = (pixels.astype(np.float32) / 255 - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    np.testing.assert_allclose(got, reference_embeddings(small_files["model"], "block.4", normalized), atol=1e-5)
    assert pixels.dtype == np.uint8 and pixels.max() > 1  # the caller's array is untouched


def test_normalizing_a_float32_input_does_not_modify_the_callers_array(small_files):
    images = IMAGES.copy()
    encoder(small_files, "block.4", scale=0.5, mean=[0.1], std=[2.0]).embed(images)
    np.testing.assert_array_equal(images, IMAGES)


def test_npy_bodies_are_decoded_without_a_copy():
    from image_embedder.request_decoding import decode_request

    body = bytearray(npy_bytes(np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)))
    [images] = decode_request(body, "application/x-npy").images
    assert np.shares_memory(images, np.frombuffer(body, np.uint8))


def test_num_threads_setting_sets_torch_threads(small_files):
    before = torch.get_num_threads()
    try:
        encoder(small_files, "block.2", num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_layer_tap_accepts_a_compiled_forward(small_files):
    # A compiled module's truth value raises (it refuses len()); the tap must not ask for it.
    model = small_files["model"]
    tap = LayerTap(model, ["block.2"], early_exit=False)
    try:
        class Falsy(torch.nn.Module):
            def __len__(self) -> int:
                raise TypeError("no len")

            def forward(self, x):
                return model(x)

        with torch.inference_mode():
            [out] = tap(torch.from_numpy(IMAGES), Falsy())
        assert out.shape == (4, 16, 32, 32)
    finally:
        tap.remove()


# In a process of its own (compiling takes 10-20 s of one core): the small files, the encoder with
# compile=True, its answers, written to the job's folder for the test to check.
COMPILED = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_perf_options import IMAGES, encoder, write_small_files
files = write_small_files(sys.argv[2])
enc = encoder(files, "block.2", compile=True)
runs = [enc.embed(IMAGES) for _ in range(2)]  # the first call compiles, the second runs the compiled graph
other = enc.embed(IMAGES[::-1].copy())  # a different input: the capture is not a stale tensor from tracing
np.savez(sys.argv[2] + "/compiled.npz", early_exit=enc.tap.early_exit, first=runs[0], second=runs[1], other=other)
"""


def run_compiled(lane: Lane, folder: str) -> tuple[Completed, str]:
    return lane.run([sys.executable, "-c", COMPILED, os.path.dirname(os.path.abspath(__file__)), folder], cwd=folder,
                    env=dict(os.environ), timeout=300), folder


COMPILED_RUN = background.job("torch.compile", run_compiled)


@pytest.mark.slow
@pytest.mark.background(COMPILED_RUN.name)
@pytest.mark.skipif(os.environ.get("SKIP_COMPILE_TESTS") == "1", reason="SKIP_COMPILE_TESTS=1")
def test_torch_compile_keeps_the_hook_and_the_embedding():
    proc, folder = COMPILED_RUN.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, model = np.load(os.path.join(folder, "compiled.npz")), small_reference(folder)
    assert not out["early_exit"]  # early exit is off under compile: the hook must still capture
    for got in (out["first"], out["second"]):
        np.testing.assert_allclose(got, reference_embeddings(model, "block.2", IMAGES), atol=1e-5)
    other = IMAGES[::-1].copy()
    np.testing.assert_allclose(out["other"], reference_embeddings(model, "block.2", other), atol=1e-5)
