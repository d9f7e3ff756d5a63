"""A .npy body: one image (C,H,W) or a batch (N,C,H,W), any dtype decoded_request allows."""
from __future__ import annotations

from typing import Optional

from ..decoded_request import DecodedRequest, DecodeImage, check_images
from ..image_decoding import sniff_format
from ..npy_codec import NPY_MAGIC, read_npy
from .base import NPY_CONTENT_TYPES, Body, WireFormat


class NpyArrays(WireFormat):
    """Bytes starting with numpy's magic, or sent as .npy/octet-stream and not a PNG/JPEG (the refusal
    then says why they are no .npy)."""

    name = "npy"

    def matches(self, body: Body) -> bool:
        raw = body.raw
        if not raw:
            return False
        return raw[:6] == NPY_MAGIC or (body.content_type in NPY_CONTENT_TYPES and sniff_format(raw) is None)

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        return DecodedRequest([check_images(read_npy(body.raw), ".npy array")], self)
