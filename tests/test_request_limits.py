"""Size limits that keep one request from exhausting memory.

- TorchServe's own `max_request_size`: a body over it gets 413 before any worker sees it (real server
  with a small override), and the server keeps serving.
- `max_images_per_request`: more images in one request get a clear 413 JSON error.
- `max_batch_pixels`: a large request is split into several forward passes (counted with a hook on
  the model) whose rows come back in order; one image larger than a whole pass gets a clear 413.
"""
from __future__ import annotations

import numpy as np
import pytest
import requests

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import ArchiveSpec, build_archive

IMAGE = (3, 224, 224)
PER_IMAGE = 3 * 224 * 224
MAX_IMAGES = 6
MAX_PIXELS = 2 * PER_IMAGE  # two example images per forward pass


@pytest.fixture(scope="module")
def limited_service(example_files, tmp_path_factory):
    """The example with max_images_per_request=6 and max_batch_pixels of two images, plus a pass counter."""
    store = tmp_path_factory.mktemp("limits_store")
    mar = build_archive(ArchiveSpec(example_files["model_file"], "CustomModel", example_files["state_dict"], "conv1",
                        name="limited", export_path=str(store), batch_size=32,
                        settings={"max_images_per_request": MAX_IMAGES, "max_batch_pixels": MAX_PIXELS}), quiet=True)
    service = InProcessModel(mar)
    handler = service.handler
    passes: list[int] = []
    handler.encoder.model.register_forward_pre_hook(lambda module, args: passes.append(int(args[0].shape[0])))
    return service, passes


def embeddings(resp) -> np.ndarray:
    assert resp.status == 200, resp.body[:300]
    return np.asarray(resp.json()["embeddings"], np.float32)


def test_large_request_is_split_into_passes_with_rows_in_order(limited_service, example_model):
    service, passes = limited_service
    images = np.random.default_rng(3).random((5, *IMAGE), dtype=np.float32)
    passes.clear()
    [resp] = service.predict([Request(npy_bytes(images))])
    assert passes == [2, 2, 1]
    np.testing.assert_allclose(embeddings(resp), reference_embeddings(example_model, "conv1", images), atol=1e-5)


def test_requests_sharing_a_batch_are_split_and_each_gets_its_rows(limited_service, example_model):
    service, passes = limited_service
    rng = np.random.default_rng(4)
    batches = [rng.random((n, *IMAGE), dtype=np.float32) for n in (3, 1, 2)]
    passes.clear()
    responses = service.predict([Request(npy_bytes(b)) for b in batches])
    assert passes == [2, 2, 2]  # six images of one shape, across three requests, two per pass
    for batch, resp in zip(batches, responses):
        np.testing.assert_allclose(embeddings(resp), reference_embeddings(example_model, "conv1", batch), atol=1e-5)


def test_small_images_fill_a_pass_up_to_the_pixel_budget(limited_service):
    service, passes = limited_service
    images = np.random.default_rng(5).random((MAX_IMAGES, 3, 32, 32), dtype=np.float32)
    passes.clear()
    [resp] = service.predict([Request(npy_bytes(images))])
    assert resp.status == 200 and embeddings(resp).shape == (MAX_IMAGES, 10)
    assert passes == [MAX_IMAGES]  # 6 x 3x32x32 fits one pass: the budget is pixels, not a fixed count


def test_too_many_images_are_refused_and_cost_nothing_else(limited_service, example_model):
    service, passes = limited_service
    rng = np.random.default_rng(6)
    too_many = np.zeros((MAX_IMAGES + 1, 3, 32, 32), np.float32)
    good = rng.random(IMAGE, dtype=np.float32)
    passes.clear()
    bad, ok = service.predict([Request(npy_bytes(too_many)), Request(npy_bytes(good))])
    assert bad.status == 413 and bad.content_type == "application/json"
    error = bad.json()
    assert error["code"] == 413 and error["type"] == "TooManyImages"
    assert f"{MAX_IMAGES + 1} images" in error["message"] and "max_images_per_request" in error["message"]
    assert passes == [1]  # the refused request never reached the model
    np.testing.assert_allclose(embeddings(ok), reference_embeddings(example_model, "conv1", good), atol=1e-5)


def test_one_image_larger_than_a_pass_is_refused(limited_service):
    service, passes = limited_service
    huge = np.zeros((1, 3, 320, 320), np.uint8)  # 307200 values > 301056
    passes.clear()
    [resp] = service.predict([Request(npy_bytes(huge))])
    assert resp.status == 413
    error = resp.json()
    assert error["type"] == "ImageTooLarge" and "max_batch_pixels" in error["message"]
    assert str(MAX_PIXELS) in error["message"]
    assert passes == []
    json_body = {"data": np.zeros((MAX_IMAGES + 1, 1, 2, 2)).tolist()}  # the JSON forms are limited too
    [resp] = service.predict([Request(json_body, "application/json")])
    assert resp.status == 413 and resp.json()["type"] == "TooManyImages"


# -- TorchServe's max_request_size, on a real server -----------------------------------------------------

LIMIT = 200_000  # bytes: a uint8 3x224x224 image (150 KB) fits, a float32 one (602 KB) does not


@pytest.fixture(scope="module")
def small_limit_server(model_store, example_archive):
    if not java_available():
        pytest.fail("TorchServe needs Java 17")
    server = TorchServe(model_store, "encoder=encoder.mar", overrides={"max_request_size": str(LIMIT)})
    server.start(timeout=240)
    yield server
    server.cleanup()


@pytest.mark.server
def test_request_over_max_request_size_gets_413(small_limit_server, example_model):
    server = small_limit_server
    url = f"{server.inference_url}/predictions/encoder"
    rng = np.random.default_rng(8)
    big = rng.random(IMAGE, dtype=np.float32)
    body = npy_bytes(big)
    assert len(body) > LIMIT
    r = requests.post(url, data=body, headers=server.headers(**{"Content-Type": "application/x-npy"}), timeout=120)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    json_body = ('{"data": ' + str(np.zeros(IMAGE, np.uint8).tolist()) + "}").encode()
    assert len(json_body) > LIMIT
    r = requests.post(url, data=json_body, headers=server.headers(**{"Content-Type": "application/json"}), timeout=120)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    # just under the limit is served, and correctly: the server is unharmed
    small = rng.integers(0, 256, IMAGE, dtype=np.uint8)
    body = npy_bytes(small)
    assert len(body) < LIMIT
    r = requests.post(url, data=body, headers=server.headers(**{"Content-Type": "application/x-npy"}), timeout=120)
    assert r.status_code == 200, r.text[:300]
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32),
                               reference_embeddings(example_model, "conv1", small.astype(np.float32)), atol=1e-5, rtol=1e-6)
