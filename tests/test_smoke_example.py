"""The example end to end in process: conv1 of a (3,224,224) image is a (10,) embedding."""
import numpy as np

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import Request


def test_example_single_image_matches_reference(example_service, example_model):
    image = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    [resp] = example_service.predict([Request(npy_bytes(image))])
    assert resp.status == 200, resp.body
    assert resp.content_type == "application/json"
    got = np.asarray(resp.json()["embeddings"], dtype=np.float32)
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, reference_embeddings(example_model, "conv1", image), atol=1e-5)
