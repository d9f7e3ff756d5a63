"""The GPU path: uint8 batches cross to the device as uint8 from pinned memory, embeddings match the
CPU reference, autocast stays close, and a real CUDA out-of-memory costs only its shape group (507).

Skipped without CUDA (the development machines have none); scripts/gpu_check.sh runs these on one,
with --noconftest (a GPU machine may lack TorchServe): so the fixtures are this module's own.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from image_embedder.encoder import ImageEncoder, resolve_device
from image_embedder.errors import RequestError
from image_embedder.settings import EncoderSettings
from image_embedder_testkit.imagenet import IMAGENET, MEAN, STD
from image_embedder_testkit.reference import load_reference_model, reference_embeddings

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY_MODEL = textwrap.dedent('''
    """A small conv net that asks for an impossible amount of device memory on images wider than 512."""
    import torch
    from torch import nn


    class Greedy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            if x.shape[-1] > 512 and x.is_cuda:
                torch.empty(1 << 50, dtype=torch.uint8, device=x.device)  # 1 PiB: a real CUDA OOM
            return self.head(self.conv1(x).mean((2, 3)))
''')


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "custom_model", "model.py")


@pytest.fixture(scope="module")
def example_files(tmp_path_factory) -> dict:
    """The example CustomModel and the state_dict its own __main__ writes."""
    folder = tmp_path_factory.mktemp("cuda_example")
    model_file = shutil.copy(EXAMPLE, folder / "model.py")
    weights = folder / "model_state_dict.pth"
    subprocess.run([sys.executable, str(model_file), str(weights)], check=True, capture_output=True)
    return {"model_file": str(model_file), "state_dict": str(weights), "class": "CustomModel"}


@pytest.fixture(scope="module")
def example_model(example_files) -> torch.nn.Module:
    return load_reference_model(example_files["model_file"], example_files["class"], example_files["state_dict"])


def encoder_for(example_files: dict, **extra) -> ImageEncoder:
    settings = EncoderSettings.from_mapping({
        "model_definition_file": os.path.basename(example_files["model_file"]),
        "model_class_name": example_files["class"],
        "model_state_dict_path": os.path.basename(example_files["state_dict"]),
        "layer_name": "conv1", "device": "cuda", **IMAGENET, **extra})
    return ImageEncoder(settings, os.path.dirname(example_files["model_file"]))


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 convolutions, so 1e-5 comparisons with the CPU reference hold."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def normalized(images: np.ndarray) -> np.ndarray:
    mean, std = np.array(MEAN), np.array(STD)
    return ((images / 255.0 - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def test_gpu_id_picks_the_device():
    assert resolve_device(None, 0) == torch.device("cuda:0")


def test_uint8_batches_match_cpu_reference_and_cross_as_uint8(example_files, example_model):
    encoder = encoder_for(example_files)
    images = np.random.default_rng(0).integers(0, 256, (32, 3, 224, 224), dtype=np.uint8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        batch = encoder.prepare([images[:16], images[16:]])
        torch.cuda.synchronize()
    assert batch.device.type == "cuda" and batch.dtype == torch.float32
    copies = [e for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies and all("Pinned" in e.name for e in copies), [e.name for e in copies]
    np.testing.assert_allclose(batch.cpu().numpy(), normalized(images), atol=1e-5)
    got = encoder.embed_prepared(batch)
    want = reference_embeddings(example_model, "conv1", normalized(images))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_stays_close_to_float32(example_files, dtype):
    images = np.random.default_rng(1).integers(0, 256, (8, 3, 224, 224), dtype=np.uint8)
    base = encoder_for(example_files).embed_requests([[images]])[0]
    low = encoder_for(example_files, dtype=dtype).embed_requests([[images]])[0]
    cos = (low * base).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(base, axis=1))
    assert cos.min() > 0.999, cos


def test_cuda_out_of_memory_fails_only_its_shape_group(tmp_path):
    (tmp_path / "greedy.py").write_text(GREEDY_MODEL)
    settings = EncoderSettings.from_mapping({"model_definition_file": "greedy.py", "model_class_name": "Greedy",
                                             "layer_name": "conv1", "device": "cuda"})
    encoder = ImageEncoder(settings, str(tmp_path))
    small = np.zeros((1, 3, 64, 64), np.uint8)
    wide = np.zeros((1, 3, 64, 640), np.uint8)
    results = encoder.embed_requests([[small], [wide], [small, small]])
    assert isinstance(results[0], np.ndarray) and results[0].shape == (1, 8)
    assert isinstance(results[1], RequestError) and results[1].status == 507, results[1]
    assert isinstance(results[2], np.ndarray) and results[2].shape == (2, 8)
    again = encoder.embed_requests([[small]])  # the device is usable after the OOM
    assert isinstance(again[0], np.ndarray)
