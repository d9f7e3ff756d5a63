"""One TorchServe request in, a checked batch of images out (or a RequestError for that request alone).

Accepted bodies:
- .npy bytes (application/x-npy or application/octet-stream): one image (C,H,W) or a batch (N,C,H,W);
- JSON `{"data": nested list}`, KServe v1 `{"instances": [...]}`, KServe v2 `{"inputs": [...]}`, and
  KServe v2 binary (a JSON header + tensor bytes, with Inference-Header-Content-Length; see kserve_v2);
- encoded images (PNG/JPEG), when an image decoder is plugged in (see `image_decoding`): one as the
  body, several as multipart/form-data (one part each) or JSON `{"images": ["<base64>", ...]}`.
Values become float32 later, unscaled unless the settings ask for scale/mean/std.
A form body (application/x-www-form-urlencoded, curl's default) is a 415 naming the Content-Type to send.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from . import kserve_v2
from .errors import RequestError, bad_request
from .npy_codec import NPY_MAGIC, read_npy

ALLOWED_DTYPES = (np.uint8, np.float16, np.float32, np.float64)
ALLOWED_DTYPE_NAMES = ", ".join(np.dtype(d).name for d in ALLOWED_DTYPES)
NPY_CONTENT_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
FORM_TYPE = "application/x-www-form-urlencoded"


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


@dataclass(frozen=True)
class Describe:
    """A request with the `describe: true` header: answered with what is served, no embedding."""


DecodeImage = Callable[[Any, str], Optional[list[np.ndarray]]]


def request_body(row: dict) -> Any:
    """The payload TorchServe hands over for one request: `body` or `data`, else the only part."""
    for key in ("body", "data"):
        if key in row and row[key] is not None:
            return row[key]
    if len(row) == 1:
        return next(iter(row.values()))
    return None


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


def _json_array(data: Any, where: str, dtype: type = np.float32) -> np.ndarray:
    if isinstance(data, (str, bytes, dict)) or data is None:
        raise bad_request(f"{where} must be a nested list of numbers, got {type(data).__name__}", "InvalidJson")
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise bad_request(f"{where} is not a rectangular nested list of numbers: {exc}", "InvalidJson") from exc
    return array


def _from_kserve_v2(payload: Any, binary: Any, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
    decode_image = None
    if image_decoder is not None:
        def decode_image(data: bytes, where: str) -> list[np.ndarray]:
            return _decode_image_part(data, "", where, image_decoder)
    request = kserve_v2.decode(payload, binary, check_images, decode_image)
    return DecodedRequest(request.images, "kserve_v2", request.request_id, binary_output=request.binary_output)


def decode_json(payload: Any, image_decoder: Optional[DecodeImage] = None) -> DecodedRequest:
    """A decoded JSON body: arrays in one of the three accepted forms, or base64 `images`."""
    if isinstance(payload, dict):
        if "images" in payload:
            return decode_base64_images(payload["images"], image_decoder)
        if "inputs" in payload:
            return _from_kserve_v2(payload, None, image_decoder)
        if "instances" in payload:
            return DecodedRequest([check_images(_json_array(payload["instances"], "instances"), "instances")], "kserve_v1")
        if "data" in payload:
            return DecodedRequest([check_images(_json_array(payload["data"], "data"), "data")], "data")
        raise bad_request(
            f'JSON body has keys {sorted(payload)[:10]}; expected "data", "instances" (KServe v1) or "inputs" (KServe v2)',
            "InvalidJson",
        )
    if isinstance(payload, list):
        return DecodedRequest([check_images(_json_array(payload, "body"), "body")], "data")
    raise bad_request(f"JSON body must be an object, got {type(payload).__name__}", "InvalidJson")


def _parse_json_bytes(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise bad_request("JSON body is nested too deeply", "InvalidJson") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"body is not valid JSON: {exc}", "InvalidJson") from exc


def decode_request(
    body: Any,
    content_type: str = "",
    image_decoder: Optional[DecodeImage] = None,
    header_length: Optional[str] = None,
) -> DecodedRequest:
    """Decode one request body; the content type, else the bytes themselves, pick the format.
    `header_length` is the Inference-Header-Content-Length header: a KServe v2 binary request."""
    content_type = (content_type or "").split(";")[0].strip().lower()
    if content_type == FORM_TYPE:
        raise RequestError(
            415, "UnsupportedMediaType",
            "Content-Type application/x-www-form-urlencoded (curl's default for --data) can't carry an image or "
            "JSON: TorchServe parses it as a form and the body is lost; send it again with "
            "-H 'Content-Type: application/json' (JSON), application/x-npy (.npy) or --data-binary with "
            "image/png, image/jpeg",
        )
    if header_length is not None:
        if isinstance(body, (dict, list)):  # TorchServe parsed a JSON-only body: no binary section
            return _from_kserve_v2(body, memoryview(b""), image_decoder)
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, (bytes, bytearray)):
            raise bad_request(f"unsupported body of type {type(body).__name__}", "InvalidBody")
        header, binary = kserve_v2.split_body(body, header_length)
        return _from_kserve_v2(header, binary, image_decoder)
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise bad_request("request body is empty; send .npy bytes or a JSON body", "EmptyBody")
    if isinstance(body, (dict, list)):
        return decode_json(body, image_decoder)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        raise bad_request(f"unsupported body of type {type(body).__name__}", "InvalidBody")
    if body[:6] == NPY_MAGIC:
        return DecodedRequest([check_images(read_npy(body), ".npy array")], "npy")
    if image_decoder is not None:
        images = image_decoder(body, content_type)
        if images is not None:
            return DecodedRequest([check_images(a, "image") for a in images], "image")
    if content_type in NPY_CONTENT_TYPES:
        read_npy(body)  # raises the precise reason
    first = bytes(body[:64]).lstrip()[:1]
    if content_type.endswith("json") or first in (b"{", b"["):
        return decode_json(_parse_json_bytes(body), image_decoder)
    raise bad_request(
        f"cannot decode a body of {len(body)} bytes with Content-Type {content_type or 'unset'!r}: "
        "send .npy (application/x-npy) or JSON (application/json)",
        "UnsupportedMediaType",
    )


def _no_image_decoder() -> RequestError:
    return RequestError(415, "ImagesUnsupported", "this server does not decode images; send .npy or JSON arrays")


def decode_base64_images(items: Any, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
    """`{"images": ["<base64 PNG/JPEG>", ...]}` (a data: URL prefix is allowed): one image each, in order."""
    if image_decoder is None:
        raise _no_image_decoder()
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise bad_request('"images" must be a non-empty list of base64-encoded PNG or JPEG strings', "InvalidJson")
    images: list[np.ndarray] = []
    for i, item in enumerate(items):
        where = f"images[{i}]"
        if not isinstance(item, str):
            raise bad_request(f"{where} must be a base64 string, got {type(item).__name__}", "InvalidJson")
        if item.startswith("data:") and "," in item:  # data:image/png;base64,....
            item = item.split(",", 1)[1]
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"{where} is not valid base64: {exc}", "InvalidBase64") from exc
        images.extend(_decode_image_part(data, "", where, image_decoder))
    return DecodedRequest(images, "image")


def _decode_image_part(data: Any, content_type: str, where: str, image_decoder: DecodeImage) -> list[np.ndarray]:
    try:
        decoded = image_decoder(data, content_type) if len(data) else None
    except RequestError as exc:
        raise RequestError(exc.status, exc.kind, f"{where}: {exc.message}") from exc
    if decoded is None:
        raise bad_request(f"{where} ({len(data)} bytes) is not a PNG or JPEG image", "InvalidImage")
    return [check_images(a, where) for a in decoded]


def decode_multipart(parts: list[tuple[str, Any, str]], image_decoder: Optional[DecodeImage]) -> DecodedRequest:
    """multipart/form-data, one (name, value, content type) per part: each part one image or .npy array,
    answered in part order. TorchServe keys parts by name, so parts need distinct names."""
    if not parts:
        raise bad_request("multipart body has no parts; send one part per image", "EmptyBody")
    images: list[np.ndarray] = []
    for name, value, content_type in parts:
        where = f"part {name!r}"
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)) or not value:
            raise bad_request(f"{where} is empty or not a file; send one PNG, JPEG or .npy file per part", "InvalidPart")
        if bytes(value[:6]) == NPY_MAGIC:
            images.append(check_images(read_npy(value), where))
        elif image_decoder is None:
            raise _no_image_decoder()
        else:
            images.extend(_decode_image_part(value, content_type, where, image_decoder))
    return DecodedRequest(images, "image")


PART_HEADERS_MAX = 1024  # bytes of one part's own headers (Content-Disposition with names, Content-Type)


def check_no_part_dropped(parts: list[tuple[str, Any, str]], content_length: Any, content_type: str) -> None:
    """Refuse a multipart body whose parts TorchServe merged: it keys parts by name and keeps the last of
    each name, so the handler never sees the others. What it can see is the body's Content-Length: if
    that exceeds the parts handed over plus each part's framing (boundary and headers, at most
    PART_HEADERS_MAX bytes), parts were dropped. A dropped part smaller than that framing slack
    (a tiny file, not a real image) can't be told apart from long headers."""
    try:
        length = int(str(content_length))
    except (TypeError, ValueError):
        return  # chunked upload: no length to compare with
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    framing = len(parts) * (len(boundary) + 8 + PART_HEADERS_MAX) + len(boundary) + 8
    received = sum(len(v) if isinstance(v, (bytes, bytearray, str)) else 0 for _, v, _ in parts)
    if length - received > framing:
        names = sorted({name for name, _, _ in parts})
        raise bad_request(
            f"the multipart body is {length} bytes but TorchServe handed over {received} bytes in {len(parts)} "
            f"part(s) named {names}: parts that share a name are merged by TorchServe (it keeps the last one), so "
            "some images would be lost; give each part its own name (-F img0=@a.jpg -F img1=@b.png)",
            "RepeatedPartName",
        )


def check_request_limits(request: DecodedRequest, max_images: int, max_batch_pixels: int) -> None:
    """Refuse requests that would exhaust memory: too many images, or one image too big for a pass."""
    if request.count > max_images:
        raise RequestError(
            413, "TooManyImages",
            f"request holds {request.count} images; at most {max_images} (max_images_per_request) are allowed",
        )
    for batch in request.images:
        per_image = math.prod(batch.shape[1:])
        if per_image > max_batch_pixels:
            raise RequestError(
                413, "ImageTooLarge",
                f"one image of shape {tuple(batch.shape[1:])} has {per_image} values; at most "
                f"{max_batch_pixels} (max_batch_pixels) fit in one forward pass",
            )


def accepted_content_types(images: bool) -> list[str]:
    """The request Content-Types this server decodes (for describe and the docs)."""
    types = ["application/x-npy", "application/octet-stream", "application/json",
             "application/octet-stream with Inference-Header-Content-Length (KServe v2 binary)"]
    if images:
        types += ["image/png", "image/jpeg", "multipart/form-data"]
    return types
