"""Encoded images at production rates: the parallel decode gives what the sequential one gives, and
the two inexact speed options (`exact_resize: false`, `jpeg_draft`) stay as close as the docs say.

Expectations come from Pillow with sizes and crop corners worked out by hand (by_hand), or from the
sequential path that test_image_decoding.py checks independently; never from the code under test alone.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from image_embedder.errors import ConfigError, RequestError
from image_embedder.image_decoding import ImageDecoder
from image_embedder.settings import EncoderSettings
from image_embedder_testkit.bodies import encoded_image
from image_embedder_testkit.compare import cosine_min
from image_embedder_testkit.feature_server import IMAGE_SETTINGS
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import ArchiveSpec, build_archive


def photo(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth blocks plus noise, so JPEG and resizing behave roughly as on photos."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((16, 16, 1)))[:height, :width] + rng.normal(0, 8, (height, width, 3))
    return np.clip(big, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", orientation: int = 0) -> bytes:
    return encoded_image(array, fmt, 90, orientation)


# The decoded (height, width) of IMAGES[:4] -> the size with the shorter side at 256 and the longer
# one scaled and rounded down (640 * 256 / 480 = 341.3 -> 341), and the top-left corner of the central
# 224 x 224 window ((341 - 224) / 2 = 58.5 -> 58: halves round to even, as torchvision's center_crop).
RESIZED = {(480, 640): ((256, 341), (16, 58)), (1080, 1920): ((256, 455), (16, 116)),
           (333, 517): ((256, 397), (16, 86)), (300, 200): ((384, 256), (80, 16))}


def by_hand(data: bytes) -> np.ndarray:
    """Full Pillow decode, bilinear resize to the size in RESIZED, the crop at its corner: uint8 CHW."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    (height, width), (top, left) = RESIZED[(image.height, image.width)]
    array = np.asarray(image.resize((width, height), Image.BILINEAR))
    return array[top: top + 224, left: left + 224].transpose(2, 0, 1)


IMAGES = [encode(photo(1, 480, 640)), encode(photo(2, 1080, 1920)), encode(photo(3, 333, 517), "PNG"),
          encode(photo(4, 300, 200)), encode(photo(5, 1280, 960), orientation=6)]


def test_default_path_is_exact_against_pillow_by_hand():
    decoder = ImageDecoder("RGB", 256, 224)
    for data in IMAGES[:4]:
        [got] = decoder(data, "")
        np.testing.assert_array_equal(got[0], by_hand(data))


def test_prefetched_batch_equals_sequential_and_runs_in_the_pool(monkeypatch):
    sequential = ImageDecoder("RGB", 256, 224)
    parallel = ImageDecoder("RGB", 256, 224, threads=4)
    rows = [{"body": bytearray(IMAGES[0])}, {"img0": bytearray(IMAGES[1]), "img1": bytearray(IMAGES[2])},
            {"body": bytearray(b"\xff\xd8\xff" + b"not really a jpeg")}, {"body": {"data": [1, 2]}},
            {"body": bytearray(IMAGES[4])}]
    threads: set[str] = set()
    decode = ImageDecoder.decode

    def recording(self, data, where="image"):
        threads.add(threading.current_thread().name)
        return decode(self, data, where)

    monkeypatch.setattr(ImageDecoder, "decode", recording)
    parallel.prefetch(rows)
    for row in rows:
        for value in row.values():
            if not isinstance(value, bytearray):
                continue
            try:
                want = sequential(value, "")
            except RequestError as exc:
                with pytest.raises(RequestError) as err:
                    parallel(value, "")
                assert (err.value.status, err.value.message) == (exc.status, exc.message)
                continue
            got = parallel(value, "")
            assert len(got) == 1 and got[0].dtype == np.uint8
            np.testing.assert_array_equal(got[0], want[0])
    assert any(name.startswith("image-decode") for name in threads), threads
    assert not parallel._pending  # every prefetched image was collected
    # a body the pool never saw is decoded on the spot; leftovers of a batch go at the next prefetch
    np.testing.assert_array_equal(parallel(IMAGES[3], "")[0], sequential(IMAGES[3], "")[0])
    parallel.prefetch([{"a": bytearray(IMAGES[0]), "b": bytearray(IMAGES[2])}])
    assert len(parallel._pending) == 2
    parallel.prefetch([])
    assert not parallel._pending


def test_crop_window_resize_is_within_one_grey_level():
    fast = ImageDecoder("RGB", 256, 224, exact_resize=False)
    for data in IMAGES[:4]:
        got = fast(data, "")[0][0].astype(int)
        want = by_hand(data).astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1
        assert np.abs(got - want).mean() < 0.25  # measured: ~0.0002 when shrinking, ~0.2 when enlarging


def test_jpeg_draft_keeps_shape_and_stays_close():
    draft = ImageDecoder("RGB", 256, 224, jpeg_draft=True)
    big = IMAGES[1]  # 1920x1080: libjpeg decodes at 1/4
    got = draft(big, "")[0][0]
    want = by_hand(big)
    assert got.shape == want.shape == (3, 224, 224)
    assert cosine_min(got[None], want[None]) > 0.995
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 8
    # PNGs and images too small to draft are untouched by the option
    for data in IMAGES[2:4]:
        np.testing.assert_array_equal(draft(data, "")[0], ImageDecoder("RGB", 256, 224)(data, "")[0])


def test_draft_with_exif_rotation_keeps_orientation():
    rotated = IMAGES[4]  # stored 1280 high x 960 wide, EXIF 6: shown 960 high x 1280 wide; drafted at 1/2
    plain = ImageDecoder("RGB", 256, None)(rotated, "")[0]
    drafted = ImageDecoder("RGB", 256, None, jpeg_draft=True)(rotated, "")[0]
    assert plain.shape == drafted.shape == (1, 3, 256, 341)
    assert cosine_min(plain, drafted) > 0.995


def test_settings_for_decoding_are_checked_and_used():
    base = {"model_definition_file": "m.py", "model_class_name": "M"}
    for bad in ({"decode_threads": 0}, {"jpeg_draft": "yes"}, {"max_image_pixels": -1}, {"exact_resize": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EncoderSettings.from_mapping({**base, **bad})
    settings = EncoderSettings.from_mapping({**base, "decode_threads": 3, "jpeg_draft": True, "max_image_pixels": 1000,
                                             "resize": 64, "center_crop": 32, "exact_resize": False})
    decoder = ImageDecoder.from_settings(settings)
    assert (decoder.threads, decoder.jpeg_draft, decoder.exact_resize, decoder.max_pixels) == (3, True, False, 1000)
    with pytest.raises(RequestError) as err:
        decoder(encode(photo(6, 40, 30)), "")  # 1200 pixels
    assert err.value.status == 413 and "1200 pixels" in err.value.message and "1000" in err.value.message


@pytest.fixture(scope="module")
def image_services(example_files, tmp_path_factory):
    """The example model as an image archive, decoding with 1 thread and with 4, loaded as a worker would."""
    store = str(tmp_path_factory.mktemp("parallel_store"))
    services = {}
    for threads in (1, 4):
        mar = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                        "conv1", input_shape=[3, 224, 224], name=f"img{threads}", export_path=store,
                                        settings={**IMAGE_SETTINGS, "decode_threads": threads}), quiet=True)
        services[threads] = InProcessModel(mar, model_name=f"img{threads}")
    return services


def test_worker_batch_parallel_equals_sequential_and_reference(image_services, example_model):
    requests = [Request(IMAGES[0], "image/jpeg"), Request(b"\xff\xd8\xffbroken", "image/jpeg"),
                Request(IMAGES[2], "image/png"), Request(IMAGES[3], "image/jpeg")]
    sequential = image_services[1].predict(requests)
    parallel = image_services[4].predict(requests)
    assert [r.status for r in parallel] == [r.status for r in sequential] == [200, 400, 200, 200]
    assert "cannot be decoded" in parallel[1].json()["message"]
    mean, std = np.array(IMAGE_SETTINGS["mean"]), np.array(IMAGE_SETTINGS["std"])
    for i in (0, 2, 3):
        got = np.asarray(parallel[i].json()["embeddings"], np.float32)
        np.testing.assert_array_equal(got, np.asarray(sequential[i].json()["embeddings"], np.float32))
        pixels = by_hand(bytes(requests[i].body)).astype(np.float64) / 255
        normalized = ((pixels - mean[:, None, None]) / std[:, None, None]).astype(np.float32)[None]
        np.testing.assert_allclose(got, reference_embeddings(example_model, "conv1", normalized), atol=1e-5)
