"""One TorchServe request in, a checked batch of images out (or a RequestError for that request alone).

The one way in is `decode_batch` (TorchServe's rows and each request's headers): it starts the
batch's PNG/JPEG decoding in parallel, then `decode` picks each request's protocol once and hands
its body to that protocol's decoder (here, or kserve_v2), which builds the images with the checks
in decoded_request; nothing calls back up. A refusal comes back in its protocol's error form.

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

import json
import logging
import math
from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from . import kserve_v2
from .decoded_request import (
    DecodedRequest, DecodeImage, Describe, base64_bytes, check_images, decode_image, images_unsupported, json_numbers,
)
from .errors import RequestError, as_answer, bad_request
from .image_decoding import ImageDecoder
from .npy_codec import NPY_MAGIC, read_npy
from .settings import EncoderSettings

logger = logging.getLogger(__name__)

NPY_CONTENT_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
FORM_TYPE = "application/x-www-form-urlencoded"

Decoded = Union[DecodedRequest, RequestError, Describe]


def decode_batch(rows: Sequence[Optional[dict]], headers: Sequence[Mapping[str, Any]],
                 image_decoder: Optional[ImageDecoder], settings: EncoderSettings) -> list[Decoded]:
    """Each request of one TorchServe batch, decoded and checked on its own: its DecodedRequest, its
    RequestError, or Describe. `headers[i]` are request i's headers, names lower-cased, with a multipart
    part's own headers as a dict under the part's name (as TorchServe records them)."""
    if image_decoder is not None:
        image_decoder.prefetch(rows)  # this batch's PNG/JPEGs decode in parallel from here on
    decoded: list[Decoded] = []
    for idx, (row, request_headers) in enumerate(zip(rows, headers)):
        try:
            decoded.append(decode(row or {}, request_headers, image_decoder, settings))
        except Exception as exc:  # a decoder bug must still cost only this request
            logger.exception("decoding request %d failed", idx)
            decoded.append(RequestError(500, "InternalError", f"decoding failed: {type(exc).__name__}: {exc}"))
    return decoded


def decode(row: dict, headers: Mapping[str, Any], image_decoder: Optional[DecodeImage],
           settings: EncoderSettings) -> Decoded:
    """One request: Describe for `describe: true`, else its images within the settings' limits, or the
    refusal in its protocol's form."""
    if str(headers.get("describe")).lower() == "true":
        return Describe()
    try:
        request = _decode_row(row, headers, image_decoder)
    except RequestError as exc:
        return as_answer(exc)
    try:
        check_request_limits(request, settings.max_images_per_request, settings.max_batch_pixels)
    except RequestError as exc:
        return as_answer(request.refusal(exc))
    return replace(request, accept=_header_text(headers, "accept"))


def _decode_row(row: dict, headers: Mapping[str, Any], image_decoder: Optional[DecodeImage]) -> DecodedRequest:
    """multipart/form-data: TorchServe hands each part as its own key of `row`, with the part's
    Content-Type in the request headers under the part's name; anything else is one body."""
    request_type = _header_text(headers, "content-type") or ""
    if request_type.lower().startswith("multipart/"):
        parts = [(str(name), value, _part_type(headers, name)) for name, value in row.items()]
        check_no_part_dropped(parts, headers.get("content-length"), request_type)
        return decode_multipart(parts, image_decoder)
    part_types = (_part_type(headers, name) for name in ("body", "data", *row.keys()))
    content_type = next((t for t in part_types if t), request_type)  # the part's own type, when recorded
    return decode_request(request_body(row), content_type, image_decoder, _header_text(headers, kserve_v2.HEADER_LENGTH))


def _header_text(headers: Mapping[str, Any], name: str) -> Optional[str]:
    value = headers.get(name)
    return value if isinstance(value, str) else None


def _part_type(headers: Mapping[str, Any], name: Any) -> str:
    """The Content-Type TorchServe recorded for a part (under the part's name), else ""."""
    part = headers.get(str(name).lower())
    return (part.get("content-type") or "") if isinstance(part, dict) else ""


def request_body(row: dict) -> Any:
    """The payload TorchServe hands over for one request: `body` or `data`, else the only part."""
    for key in ("body", "data"):
        if key in row and row[key] is not None:
            return row[key]
    if len(row) == 1:
        return next(iter(row.values()))
    return None


def decode_json(payload: Any, image_decoder: Optional[DecodeImage] = None) -> DecodedRequest:
    """A decoded JSON body: arrays in one of the three accepted forms, or base64 `images`."""
    if isinstance(payload, dict):
        if "images" in payload:
            return decode_base64_images(payload["images"], image_decoder)
        if "inputs" in payload:
            return kserve_v2.decode(payload, None, image_decoder)
        if "instances" in payload:
            return DecodedRequest([check_images(json_numbers(payload["instances"], "instances"), "instances")], "kserve_v1")
        if "data" in payload:
            return DecodedRequest([check_images(json_numbers(payload["data"], "data"), "data")], "data")
        raise bad_request(
            f'JSON body has keys {sorted(payload)[:10]}; expected "data", "instances" (KServe v1) or "inputs" (KServe v2)',
            "InvalidJson",
        )
    if isinstance(payload, list):
        return DecodedRequest([check_images(json_numbers(payload, "body"), "body")], "data")
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
        return kserve_v2.decode_body(body, header_length, image_decoder)
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


def decode_base64_images(items: Any, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
    """`{"images": ["<base64 PNG/JPEG>", ...]}` (a data: URL prefix is allowed): one image each, in order."""
    if image_decoder is None:
        raise images_unsupported()
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise bad_request('"images" must be a non-empty list of base64-encoded PNG or JPEG strings', "InvalidJson")
    images: list[np.ndarray] = []
    for i, item in enumerate(items):
        where = f"images[{i}]"
        if not isinstance(item, str):
            raise bad_request(f"{where} must be a base64 string, got {type(item).__name__}", "InvalidJson")
        images.extend(decode_image(base64_bytes(item, where), "", where, image_decoder))
    return DecodedRequest(images, "image")


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
        else:
            images.extend(decode_image(value, content_type, where, image_decoder))
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
