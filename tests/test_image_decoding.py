"""Encoded images in: PNG/JPEG decoded with Pillow, EXIF orientation applied, RGB/L, resize the
shorter side, center crop, then scale/mean/std; batches as multipart or base64 JSON; bad images 4xx.

Expectations never repeat the decoder's arithmetic: the resize is checked against torch's antialiased
bilinear interpolation (another implementation of what Pillow does) and against sizes worked out by
hand; the served images have a shorter side of exactly 256, so the archive's resize keeps every
pixel, and the model's input is the sent pixels cut at crop offsets written out as numbers.
"""
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from image_embedder.errors import RequestError
from image_embedder.image_decoding import ImageDecoder, color_mode_for
from image_embedder.request_decoding import decode_multipart, decode_request
from image_embedder_testkit.bodies import encoded_image
from image_embedder_testkit.feature_server import IMAGE_SETTINGS
from image_embedder_testkit.reference import reference_embeddings


def encode(array: np.ndarray, fmt: str = "PNG", exif_orientation: int = 0) -> bytes:
    return encoded_image(array, fmt, 95, exif_orientation)


def photo(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth random image (so JPEG and resizing behave as on photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, channels)).astype(np.float32)
    big = np.kron(small, np.ones((8, 8, 1)))[:height, :width]
    noise = rng.normal(0, 10, big.shape)
    out = np.clip(big + noise, 0, 255).astype(np.uint8)
    return out[:, :, 0] if channels == 1 else out


# Images whose shorter side is already the archive's resize (256): (height, width) -> the top-left
# corner of the central 224 x 224 window, counted by hand ((300 - 224) / 2 = 38, and so on).
CROP_AT = {(300, 256): (38, 16), (256, 320): (16, 48), (400, 256): (88, 16), (256, 256): (16, 16)}


def model_input(pixels: np.ndarray) -> np.ndarray:
    """What the `images` archive must feed the model for these HxWx3 uint8 pixels: crop, /255, mean, std."""
    top, left = CROP_AT[pixels.shape[:2]]
    window = pixels[top: top + 224, left: left + 224].astype(np.float64) / 255.0
    window = (window - np.array(IMAGE_SETTINGS["mean"])) / np.array(IMAGE_SETTINGS["std"])
    return window.transpose(2, 0, 1).astype(np.float32)[None]


def decoded(data: bytes) -> np.ndarray:
    """A JPEG's pixels as Pillow decodes them (lossy: the sent array is not what arrives)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def post(server, model, **kwargs):
    return requests.post(f"{server.inference_url}/predictions/{model}", timeout=120,
                         headers=server.headers(**kwargs.pop("headers", {})), **kwargs)


def embeddings(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return np.asarray(response.json()["embeddings"], dtype=np.float32)


# -- in process: the decoder's steps ---------------------------------------------------------------

def test_decoder_steps_shapes_dtype_and_modes():
    decoder = ImageDecoder("RGB", resize=20, crop=16)
    [out] = decoder(encode(photo(0, 30, 50)), "")  # sniffed from the bytes, no content type
    assert out.dtype == np.uint8 and out.shape == (1, 3, 16, 16)
    assert ImageDecoder("RGB")(encode(photo(0, 30, 50)), "image/png")[0].shape == (1, 3, 30, 50)
    gray = ImageDecoder(color_mode_for("auto", [1, 28, 28]))(encode(photo(1, 28, 28)), "image/png")[0]
    assert gray.shape == (1, 1, 28, 28)
    assert color_mode_for("auto", None) == "RGB" and color_mode_for("L", [3, 8, 8]) == "L"
    # a crop larger than the image pads with zeros around it (torchvision's CenterCrop does the same)
    padded = ImageDecoder("L", crop=12)(encode(np.full((8, 10), 200, np.uint8)), "image/png")[0][0, 0]
    assert padded.shape == (12, 12) and padded[0].max() == 0 and padded[2:10, 1:11].min() == 200
    assert ImageDecoder()(b"\x93NUMPY....", "application/x-npy") is None  # not an image: left to others


@pytest.mark.parametrize("height, width, resize, expected_hw", [
    (40, 24, 16, (26, 16)),  # portrait: width 24 -> 16, height 40 * 16 / 24 = 26.7 -> 26 (rounded down)
    (30, 50, 20, (20, 33)),  # landscape: height 30 -> 20, width 50 * 20 / 30 = 33.3 -> 33
    (21, 21, 21, (21, 21)),  # already the size: every pixel kept
])
def test_resize_matches_torch_antialiased_bilinear(height, width, resize, expected_hw):
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3)).astype(np.uint8)
    [out] = ImageDecoder("RGB", resize=resize)(encode(pixels), "image/png")
    assert out.shape == (1, 3) + expected_hw
    other = F.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None].double(), size=expected_hw,
                          mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    # Pillow works in fixed point and rounds to uint8; torch in float64: at most one level apart
    np.testing.assert_allclose(out[0].astype(np.float64), other, atol=1.0 + 1e-6)
    if expected_hw == (height, width):
        np.testing.assert_array_equal(out[0], pixels.transpose(2, 0, 1))


def test_center_crop_takes_the_middle_window_counted_by_hand():
    pixels = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9)
    [out] = ImageDecoder("L", crop=4)(encode(pixels), "image/png")
    # 6 rows -> drop 1 above and 1 below; 9 columns -> drop 2 or 3 on the left: torchvision rounds 2.5 to 2
    np.testing.assert_array_equal(out[0, 0], pixels[1:5, 2:6])


def test_exif_orientation_is_applied():
    array = photo(2, 24, 40)
    [out] = ImageDecoder("RGB")(encode(array, "JPEG", exif_orientation=6), "image/jpeg")
    plain = np.asarray(Image.open(io.BytesIO(encode(array, "JPEG"))).convert("RGB"))
    assert out.shape == (1, 3, 40, 24)  # portrait now
    np.testing.assert_allclose(out[0].transpose(1, 2, 0), np.rot90(plain, k=-1), atol=12)


def test_corrupt_and_bomb_images_are_refused(monkeypatch):
    good = encode(photo(3, 64, 64))
    with pytest.raises(RequestError) as err:
        ImageDecoder()(good[:100], "image/png")
    assert err.value.status == 400 and err.value.kind == "InvalidImage" and "PNG" in err.value.message
    with pytest.raises(RequestError) as err:
        ImageDecoder()(b"definitely not a picture", "image/jpeg")
    assert err.value.status == 400 and "neither PNG nor JPEG" in err.value.message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(RequestError) as err:
        ImageDecoder()(good, "image/png")
    assert err.value.status == 413 and err.value.kind == "ImageTooLarge" and "4096 pixels" in err.value.message


def test_base64_and_multipart_decoding_errors_name_the_item():
    decoder = ImageDecoder()
    png = base64.b64encode(encode(photo(4, 10, 10))).decode()
    req = decode_request({"images": [png, "data:image/png;base64," + png]}, "application/json", decoder)
    assert req.protocol == "image" and req.count == 2
    for body, needle in (({"images": [png, "%%%"]}, "images[1] is not valid base64"),
                         ({"images": [png, 5]}, "images[1] must be a base64 string"),
                         ({"images": []}, "non-empty list"),
                         ({"images": [base64.b64encode(b"hello").decode()]}, "images[0] (5 bytes) is not a PNG")):
        with pytest.raises(RequestError) as err:
            decode_request(body, "application/json", decoder)
        assert err.value.status == 400 and needle in err.value.message
    with pytest.raises(RequestError) as err:
        decode_multipart([("a", encode(photo(5, 9, 9)), "image/png"), ("b", b"\x89PNG\r\n\x1a\nxx", "image/png")], decoder)
    assert err.value.status == 400 and err.value.message.startswith("part 'b'")
    with pytest.raises(RequestError) as err:
        decode_request({"images": [png]}, "application/json", None)
    assert err.value.status == 415


# -- a real TorchServe ---------------------------------------------------------------------------

@pytest.mark.server
def test_one_png_matches_reference_by_hand(feature_torchserve, example_model):
    pixels = photo(10, 300, 256)  # portrait: the width is the shorter side
    data = encode(pixels)
    got = embeddings(post(feature_torchserve, "images", data=data, headers={"Content-Type": "image/png"}))
    want = reference_embeddings(example_model, "conv1", model_input(pixels))
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the same bytes sent with no content type are sniffed as PNG
    sniffed = embeddings(post(feature_torchserve, "images", data=data))
    np.testing.assert_allclose(sniffed, got, atol=1e-6)


@pytest.mark.server
def test_jpeg_with_exif_rotation_matches_reference(feature_torchserve, example_model):
    data = encode(photo(11, 256, 256), "JPEG", exif_orientation=6)
    got = embeddings(post(feature_torchserve, "images", data=data, headers={"Content-Type": "image/jpeg"}))
    # orientation 6: shown rotated 90 degrees clockwise
    want = reference_embeddings(example_model, "conv1", model_input(np.rot90(decoded(data), k=-1)))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.server
def test_multipart_and_base64_batches_answer_in_order(feature_torchserve, example_model):
    pixels = [photo(20, 256, 320), photo(21, 256, 256), photo(22, 400, 256)]
    images = [encode(pixels[0]), encode(pixels[1], "JPEG"), encode(pixels[2])]
    inputs = [model_input(pixels[0]), model_input(decoded(images[1])), model_input(pixels[2])]
    want = np.concatenate([reference_embeddings(example_model, "conv1", x) for x in inputs])
    files = [(f"img{i}", (f"{i}.bin", d, "image/png" if d[:4] == b"\x89PNG" else "image/jpeg"))
             for i, d in enumerate(images)]
    np.testing.assert_allclose(embeddings(post(feature_torchserve, "images", files=files)), want, atol=1e-5)
    files_reversed = [(f"z{9 - i}", (None, d)) for i, d in enumerate(reversed(images))]  # no part content types
    got = embeddings(post(feature_torchserve, "images", files=files_reversed))
    np.testing.assert_allclose(got, want[::-1], atol=1e-5)
    body = {"images": [base64.b64encode(d).decode() for d in images]}
    np.testing.assert_allclose(embeddings(post(feature_torchserve, "images", json=body)), want, atol=1e-5)


@pytest.mark.server
def test_bad_images_get_4xx_and_cost_others_nothing(feature_torchserve, example_model):
    pixels = photo(30, 256, 256)
    good = encode(pixels)
    want = reference_embeddings(example_model, "conv1", model_input(pixels))
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")  # 100 M pixels > Pillow's limit, ~20 kB on the wire
    bad = {
        "truncated": (dict(data=good[: len(good) // 2], headers={"Content-Type": "image/png"}), 400, "InvalidImage"),
        "garbage": (dict(data=b"\x89PNG\r\n\x1a\n" + b"\x00" * 50), 400, "InvalidImage"),
        "bomb": (dict(data=bomb.getvalue(), headers={"Content-Type": "image/png"}), 413, "ImageTooLarge"),
        "bad_part": (dict(files=[("ok", ("a.png", good, "image/png")), ("broken", ("b.png", b"nope", "image/png"))]),
                     400, "InvalidImage"),
    }
    jobs = [("good", dict(data=good, headers={"Content-Type": "image/png"}))] * 4 + [(k, v[0]) for k, v in bad.items()]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent, so TorchServe batches good and bad together
        answers = list(pool.map(lambda job: (job[0], post(feature_torchserve, "images", **job[1])), jobs))
    for name, response in answers:
        if name == "good":
            np.testing.assert_allclose(embeddings(response), want, atol=1e-5)
            continue
        _, status, kind = bad[name]
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["code"] == status and body["type"] == kind, (name, body)
        if name == "bad_part":
            assert "part 'broken'" in body["message"]
