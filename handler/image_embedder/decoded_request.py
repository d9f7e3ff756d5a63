"""What every wire format's decoder builds (a DecodedRequest, a Refusal or a Describe) and the value
checks they all apply.

The formats (wire/) import from here and never from their callers, so a body is read in one
direction: request_decoding picks a format, the format turns values into checked image batches here.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np

from .errors import RequestError, bad_request
from .output_options import OutputOptions

if TYPE_CHECKING:
    from .wire.base import WireFormat

ALLOWED_DTYPES = (np.uint8, np.float16, np.float32, np.float64)
ALLOWED_DTYPE_NAMES = ", ".join(np.dtype(d).name for d in ALLOWED_DTYPES)

# One encoded image (and its part's Content-Type) -> uint8 (1, C, H, W) arrays, or None when it is no image
DecodeImage = Callable[[Any, str], Optional[list[np.ndarray]]]


@dataclass
class DecodedRequest:
    """The images of one request, in request order (not grouped by shape), the wire format that read them
    (and writes the answer), and the request's output options."""

    images: list[np.ndarray]
    wire: Union["WireFormat", str] = "data"  # the format's object; a registry name is looked up
    request_id: Optional[str] = None  # an id the format echoes (KServe v2 `id`)
    accept: Optional[str] = None  # the request's Accept header (asks for .npy)
    options: dict[str, Any] = field(default_factory=dict)  # what the format reads when it encodes the answer
    output: OutputOptions = OutputOptions()  # the vectors' dtype and dimensions, where the request asks

    def __post_init__(self) -> None:
        if isinstance(self.wire, str):
            from .wire import by_name  # the registry imports this module

            self.wire = by_name(self.wire)

    @property
    def protocol(self) -> str:
        """The name of the wire format the request came in."""
        return self.wire.name

    @property
    def count(self) -> int:
        return sum(len(a) for a in self.images)


@dataclass(frozen=True)
class Refusal:
    """A request refused before or during its forward pass, and the format its error is written in."""

    error: RequestError
    wire: "WireFormat"


@dataclass(frozen=True)
class Describe:
    """A request answered with what is served, no embedding: `describe: true`, or a format's own
    description route (the OpenAI-style `GET v1/models`). None: the plain JSON description."""

    wire: Optional["WireFormat"] = None


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


URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # base64 has no ':', so this is a URL


def base64_bytes(text: str, where: str) -> bytes:
    """The bytes of a base64 string; a `data:` URL (data:image/png;base64,....) is read after its comma.
    Any other URL is refused unread: the server fetches nothing a request names."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    elif URL_SCHEME.match(text):
        raise bad_request(
            f"{where} is a URL ({text[:60]!r}); only data: URLs (data:image/png;base64,...) or base64 are read: "
            "the server fetches nothing a request names",
            "UrlNotFetched",
        )
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
