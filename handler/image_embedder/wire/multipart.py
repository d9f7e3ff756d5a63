"""multipart/form-data: one part per image (PNG, JPEG or .npy), answered in part order.

TorchServe hands each part as its own key of the request's row, keyed by the part's name, with the
part's Content-Type in the request headers under that name; it keeps only the last part of a name."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..decoded_request import DecodedRequest, DecodeImage, check_images, decode_image
from ..errors import bad_request
from ..npy_codec import NPY_MAGIC, read_npy
from .base import Body, WireFormat

PART_HEADERS_MAX = 1024  # bytes of one part's own headers (Content-Disposition with names, Content-Type)


class Multipart(WireFormat):
    name = "multipart"

    def matches(self, body: Body) -> bool:
        return body.parts is not None

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        check_no_part_dropped(body.parts, body.headers.get("content-length"), body.header("content-type") or "")
        return DecodedRequest(decode_multipart(body.parts, image_decoder), self)


def decode_multipart(parts: list[tuple[str, Any, str]], image_decoder: Optional[DecodeImage]) -> list[np.ndarray]:
    """One (name, value, content type) per part: each part one image or .npy array, in part order.
    TorchServe keys parts by name, so parts need distinct names."""
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
    return images


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
