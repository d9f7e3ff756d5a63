"""What every request decoder builds (a DecodedRequest) and the value checks they all apply.

The decoders (request_decoding for .npy, JSON and images; kserve_v2 for the Open Inference
Protocol) import from here and never from each other's callers, so a body is read in one direction:
the entry picks a protocol, that protocol's decoder turns values into checked image batches here.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .errors import RequestError, bad_request

ALLOWED_DTYPES = (np.uint8, np.float16, np.float32, np.float64)
ALLOWED_DTYPE_NAMES = ", ".join(np.dtype(d).name for d in ALLOWED_DTYPES)

# One encoded image (and its part's Content-Type) -> uint8 (1, C, H, W) arrays, or None when it is no image
DecodeImage = Callable[[Any, str], Optional[list[np.ndarray]]]


@dataclass
class DecodedRequest:
    """The images of one request, in request order (not grouped by shape), and how the client wants its answer."""

    images: list[np.ndarray]
    protocol: str = "data"  # data | npy | image | kserve_v1 | kserve_v2
    request_id: Optional[str] = None  # KServe v2 `id`, echoed
    binary_output: bool = False  # KServe v2: the embedding goes back as binary tensor data
    accept: Optional[str] = None  # the request's Accept header (asks for .npy)

    @property
    def count(self) -> int:
        return sum(len(a) for a in self.images)

    def refusal(self, error: RequestError) -> RequestError:
        """`error` in this request's protocol's form (a KServe v2 refusal also carries `error`)."""
        return error.for_kserve_v2() if self.protocol == "kserve_v2" else error


@dataclass(frozen=True)
class Describe:
    """A request with the `describe: true` header: answered with what is served, no embedding."""


def images_unsupported() -> RequestError:
    """The refusal of an encoded image by a server that cannot decode one."""
    return RequestError(
        415, "ImagesUnsupported", "this server does not decode images (Pillow is not installed); send .npy or JSON arrays"
    )


def check_images(array: np.ndarray, where: str = "input") -> np.ndarray:
    """Bring one image (C,H,W) or a batch (N,C,H,W) to a batch, refusing what can't be an image batch."""
    if array.dtype.type not in ALLOWED_DTYPES:
        raise bad_request(
            f"{where} has dtype {array.dtype}; supported dtypes: {ALLOWED_DTYPE_NAMES}", "UnsupportedDtype"
        )
    if array.ndim == 3:
        array = array[None]
    elif array.ndim != 4:
        raise bad_request(
            f"{where} has shape {tuple(array.shape)} ({array.ndim} dimensions); expected one image (C,H,W) "
            "or a batch (N,C,H,W)",
            "InvalidShape",
        )
    if 0 in array.shape:
        raise bad_request(f"{where} has an empty dimension in shape {tuple(array.shape)}", "InvalidShape")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise bad_request(f"{where} contains NaN or infinity", "NonFiniteValues")
    return array


def json_numbers(data: Any, where: str, dtype: type = np.float32) -> np.ndarray:
    """A (nested) JSON list of numbers as an array of `dtype`; values too large for it become infinity."""
    if isinstance(data, (str, bytes, dict)) or data is None:
        raise bad_request(f"{where} must be a nested list of numbers, got {type(data).__name__}", "InvalidJson")
    try:
        with np.errstate(over="ignore"):
            return np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise bad_request(f"{where} is not a rectangular nested list of numbers: {exc}", "InvalidJson") from exc


def base64_bytes(text: str, where: str) -> bytes:
    """The bytes of a base64 string; a `data:` URL (data:image/png;base64,....) is read after its comma."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{where} is not valid base64: {exc}", "InvalidBase64") from exc


def decode_image(data: Any, content_type: str, where: str, image_decoder: Optional[DecodeImage]) -> list[np.ndarray]:
    """One encoded PNG/JPEG (a body, a part, a base64 item or a BYTES element) as checked batches."""
    if image_decoder is None:
        raise images_unsupported()
    try:
        decoded = image_decoder(data, content_type) if len(data) else None
    except RequestError as exc:
        raise RequestError(exc.status, exc.kind, f"{where}: {exc.message}") from exc
    if decoded is None:
        raise bad_request(f"{where} ({len(data)} bytes) is not a PNG or JPEG image", "InvalidImage")
    return [check_images(a, where) for a in decoded]
