"""Encoded images in: PNG/JPEG decoded with Pillow, EXIF orientation applied, RGB/L, resize the
shorter side, center crop, then scale/mean/std; batches as multipart or base64 JSON; bad images 4xx.

The reference preprocessing is written out here with PIL and numpy, independently of image_decoding.
"""
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from feature_server import IMAGE_SETTINGS
from image_embedder.errors import RequestError
from image_embedder.image_decoding import ImageDecoder, color_mode_for
from image_embedder.request_decoding import decode_multipart, decode_request
from reference import reference_embeddings

pytestmark = pytest.mark.server


def encode(array: np.ndarray, fmt: str = "PNG", exif_orientation: int = 0) -> bytes:
    image = Image.fromarray(array)
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth random image (so JPEG and resizing behave as on photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, channels)).astype(np.float32)
    big = np.kron(small, np.ones((8, 8, 1)))[:height, :width]
    noise = rng.normal(0, 10, big.shape)
    out = np.clip(big + noise, 0, 255).astype(np.uint8)
    return out[:, :, 0] if channels == 1 else out


def by_hand(data: bytes, rotate_cw: bool = False) -> np.ndarray:
    """The archive's preprocessing written out: RGB, shorter side 256 bilinear, center 224, /255, mean, std."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    new = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    array = np.asarray(image.resize(new, Image.BILINEAR), dtype=np.float64)
    if rotate_cw:  # EXIF orientation 6: shown rotated 90 degrees clockwise. The server rotates before
        array = np.rot90(array, k=-1)  # resizing; callers pass a 256x256 image, so the order can't matter
    top, left = int(round((array.shape[0] - 224) / 2)), int(round((array.shape[1] - 224) / 2))
    array = array[top: top + 224, left: left + 224] / 255.0
    array = (array - np.array(IMAGE_SETTINGS["mean"])) / np.array(IMAGE_SETTINGS["std"])
    return array.transpose(2, 0, 1).astype(np.float32)


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

def test_one_png_matches_reference_by_hand(feature_torchserve, example_model):
    data = encode(photo(10, 300, 260))  # portrait: shorter side is the width
    got = embeddings(post(feature_torchserve, "images", data=data, headers={"Content-Type": "image/png"}))
    want = reference_embeddings(example_model, "conv1", by_hand(data))
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the same bytes sent with no content type are sniffed as PNG
    sniffed = embeddings(post(feature_torchserve, "images", data=data))
    np.testing.assert_allclose(sniffed, got, atol=1e-6)


def test_jpeg_with_exif_rotation_matches_reference(feature_torchserve, example_model):
    data = encode(photo(11, 256, 256), "JPEG", exif_orientation=6)  # square: resize is a no-op, crop commutes
    got = embeddings(post(feature_torchserve, "images", data=data, headers={"Content-Type": "image/jpeg"}))
    want = reference_embeddings(example_model, "conv1", by_hand(data, rotate_cw=True))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_multipart_and_base64_batches_answer_in_order(feature_torchserve, example_model):
    images = [encode(photo(20, 240, 320)), encode(photo(21, 230, 230), "JPEG"), encode(photo(22, 400, 250))]
    want = np.concatenate([reference_embeddings(example_model, "conv1", by_hand(d)) for d in images])
    files = [(f"img{i}", (f"{i}.bin", d, "image/png" if d[:4] == b"\x89PNG" else "image/jpeg"))
             for i, d in enumerate(images)]
    np.testing.assert_allclose(embeddings(post(feature_torchserve, "images", files=files)), want, atol=1e-5)
    files_reversed = [(f"z{9 - i}", (None, d)) for i, d in enumerate(reversed(images))]  # no part content types
    got = embeddings(post(feature_torchserve, "images", files=files_reversed))
    np.testing.assert_allclose(got, want[::-1], atol=1e-5)
    body = {"images": [base64.b64encode(d).decode() for d in images]}
    np.testing.assert_allclose(embeddings(post(feature_torchserve, "images", json=body)), want, atol=1e-5)


def test_bad_images_get_4xx_and_cost_others_nothing(feature_torchserve, example_model):
    good = encode(photo(30, 256, 256))
    want = reference_embeddings(example_model, "conv1", by_hand(good))
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
