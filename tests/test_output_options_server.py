"""Output options through a real TorchServe (token auth on): the Python client's dtype=/dimensions=
and `image-embedder embed --dtype --dimensions`, against the same server's float32 answer and the
model through a forward hook."""
import os
import subprocess
import sys

import numpy as np
import pytest

from image_embedder_client import EmbeddingClient
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.reference import reference_embeddings

pytestmark = pytest.mark.server


def test_client_and_cli_ask_for_float16_and_fewer_dimensions(torchserve, example_model, tmp_path):
    images = np.random.default_rng(0).random((3, 3, 224, 224), dtype=np.float32) * 255
    token = torchserve.keys["inference"]
    with EmbeddingClient(torchserve.inference_url, "encoder", token=token) as client:
        full = client.embed(images)
        small = client.embed(images, dtype="float16", dimensions=4)
    assert full.dtype == np.float32 and full.shape == (3, 10)
    np.testing.assert_allclose(full, reference_embeddings(example_model, "conv1", images), atol=1e-4)
    assert small.dtype == np.float16
    np.testing.assert_array_equal(small, full[:, :4].astype(np.float16))

    np.save(tmp_path / "three.npy", images)
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "embed.py"), str(tmp_path / "three.npy"),
                          "--out", str(tmp_path / "out"), "--url", torchserve.inference_url, f"--token={token}",
                          "--dtype", "float16", "--dimensions", "4", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    written = np.load(tmp_path / "out" / "embeddings.npy")
    assert written.dtype == np.float16
    np.testing.assert_array_equal(written, small)
