"""The digits example (examples/digits): a CNN trained here on scikit-learn's labelled digits, its
`embedding` layer served by the handler (TorchServe's own loader, in process), and retrieval quality
against the labels for each output option: served float32 equal to the model through a forward hook,
float16 and int8 within 0.01 of float32's mAP@10, whitening to a quarter of the width (power 0.5)
ahead of cutting to that width and within 0.01 of the full float32. Prints the table docs/digits.md
shows."""
import io
import os
import sys

import numpy as np
import pytest

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_inprocess import InProcessModel, Request

DIGITS = os.path.join(REPO, "examples", "digits")
sys.path.insert(0, DIGITS)
from digits import split  # noqa: E402
from evaluate import in_process, quality, table  # noqa: E402


def served(service: InProcessModel):
    def embed(images: np.ndarray, dtype: str | None = None, dimensions: int | None = None) -> np.ndarray:
        headers = {"Accept": "application/x-npy"}
        if dtype:
            headers["Embedding-Dtype"] = dtype
        if dimensions:
            headers["Embedding-Dimensions"] = str(dimensions)
        [resp] = service.predict([Request(npy_bytes(images), headers=headers)])
        assert resp.status == 200, resp.body[:300]
        return np.load(io.BytesIO(resp.body), allow_pickle=False)
    return embed


@pytest.fixture(scope="module")
def trained(digits_archives):
    assert digits_archives["accuracy"] > 0.9  # the model learned the digits
    names = ("digits", "digits-white", "digits-white-full")
    return digits_archives["folder"], {name: InProcessModel(digits_archives[name], batch_size=1, model_name=name)
                                       for name in names}


def test_served_vectors_retrieve_what_the_model_retrieves(trained):
    folder, services = trained
    _, (images, labels) = split()
    reference = in_process(str(folder / "digits.pth"), images)
    embed = served(services["digits"])
    np.testing.assert_allclose(embed(images), reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-5)
    rows = quality(embed, {"digits-white: whitened to 16, power 0.5": served(services["digits-white"]),
                           "digits-white-full: whitened to 16, power 1": served(services["digits-white-full"])},
                   images, labels, reference)
    print("\n" + table(rows))
    full = rows["served float32"]["map@10"]
    assert abs(full - rows["in process float32"]["map@10"]) < 1e-3
    assert full > 0.9  # a trained model's vectors retrieve the query's own digit
    for name in ("float16", "int8"):
        assert abs(rows[name]["map@10"] - full) <= 0.01, (name, rows[name], full)
    white = rows["digits-white: whitened to 16, power 0.5"]["map@10"]
    assert white >= rows["float32 first 16"]["map@10"] + 0.01 and white >= full - 0.01, rows
