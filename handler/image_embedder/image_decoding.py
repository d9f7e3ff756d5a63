"""Encoded images (PNG, JPEG) to uint8 (1, C, H, W) arrays, prepared as the archive's settings say.

Order, as torchvision's usual `Resize -> CenterCrop -> ToTensor -> Normalize` with a loader that
converts to RGB: decode, apply the EXIF orientation, convert to RGB or L, resize the shorter side
(bilinear), center-crop, then HWC -> CHW uint8. `scale`, `mean` and `std` are applied later, in
float32, by the encoder (ImageEncoder._normalize), exactly as for arrays.

Pillow is imported only when an image arrives, so an archive that never sees one serves on a
Python without Pillow.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import RequestError, bad_request

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG"}
FORMATS = ("PNG", "JPEG")


def sniff_format(body: bytes | bytearray) -> Optional[str]:
    """'PNG' or 'JPEG' from the first bytes, else None."""
    head = bytes(body[:8])
    if head.startswith(PNG_MAGIC):
        return "PNG"
    if head.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


def color_mode_for(color_mode: str, input_shape: Optional[Sequence[int]]) -> str:
    """The Pillow mode images are converted to: the setting, or for 'auto' the model's channel count."""
    if color_mode != "auto":
        return color_mode
    if input_shape and len(input_shape) == 3 and input_shape[0] == 1:
        return "L"
    return "RGB"


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(w, h) with the shorter side `shorter` and the aspect ratio kept (torchvision's rounding down)."""
    if width <= height:
        return shorter, max(1, int(shorter * height / width))
    return max(1, int(shorter * width / height)), shorter


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window of an HWC array, zero-padded first if the image is smaller."""
    height, width = array.shape[:2]
    if height < size or width < size:
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        pads = [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pads)
        height, width = array.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return array[top: top + size, left: left + size]


@dataclass(frozen=True)
class ImageDecoder:
    """Callable `(body, content_type) -> [uint8 (1, C, H, W)] | None`: None when the body is no image."""

    mode: str = "RGB"
    resize: Optional[int] = None
    crop: Optional[int] = None
    max_pixels: Optional[int] = None  # None: Pillow's own Image.MAX_IMAGE_PIXELS

    @classmethod
    def from_settings(cls, settings: Any) -> "ImageDecoder":
        return cls(color_mode_for(settings.color_mode, settings.input_shape), settings.resize, settings.center_crop)

    def __call__(self, body: Any, content_type: str = "") -> Optional[list[np.ndarray]]:
        content_type = (content_type or "").split(";")[0].strip().lower()
        if not isinstance(body, (bytes, bytearray)):
            return None
        fmt = sniff_format(body)
        if fmt is None and content_type not in IMAGE_CONTENT_TYPES:
            return None
        return [self.decode(body)]

    def decode(self, data: bytes | bytearray, where: str = "image") -> np.ndarray:
        """One encoded image -> prepared uint8 (1, C, H, W); a RequestError names what is wrong."""
        try:
            from PIL import Image, ImageOps
        except ImportError as exc:  # the archive's Python lacks Pillow
            raise RequestError(
                415, "ImagesUnsupported", "this server cannot decode images: Pillow is not installed; send .npy or JSON"
            ) from exc
        limit = self.max_pixels if self.max_pixels is not None else Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(data)), formats=FORMATS)
                width, height = image.size
                if limit and width * height > limit:
                    raise Image.DecompressionBombError(f"{width * height} pixels")
                image.load()
                image = ImageOps.exif_transpose(image)
                image = image.convert(self.mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RequestError(
                413, "ImageTooLarge",
                f"{where} is too large to decode ({exc}); at most {limit} pixels are allowed",
            ) from exc
        except Exception as exc:  # Pillow raises many types for corrupt data
            sniffed = sniff_format(data)
            raise bad_request(
                f"{where} ({len(data)} bytes, {sniffed or 'neither PNG nor JPEG'}) cannot be decoded: "
                f"{type(exc).__name__}: {exc}; send a valid PNG or JPEG",
                "InvalidImage",
            ) from exc
        if self.resize is not None:
            image = image.resize(resized_size(*image.size, self.resize), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        if self.crop is not None:
            array = center_crop(array, self.crop)
        if array.ndim == 2:
            array = array[:, :, None]
        return np.ascontiguousarray(array.transpose(2, 0, 1))[None]
