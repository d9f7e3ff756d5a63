"""Encoded images (PNG, JPEG): one as the body, or several as JSON `{"images": ["<base64>", ...]}`
(a `data:` URL prefix is allowed, `embedding_dtype` and `dimensions` beside `images` as for JSON arrays);
answered one row per image, in order."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..decoded_request import DecodedRequest, DecodeImage, base64_bytes, decode_image, images_unsupported
from ..errors import bad_request
from ..output_options import from_keys
from ..image_decoding import IMAGE_CONTENT_TYPES, sniff_format
from .base import Body, WireFormat


class EncodedImages(WireFormat):
    name = "image"

    @staticmethod
    def _encoded(body: Body) -> bool:
        """One image as the body (else JSON, whether TorchServe parsed it or, over gRPC, not)."""
        raw = body.raw
        return bool(raw) and (sniff_format(raw) is not None or body.content_type in IMAGE_CONTENT_TYPES)

    def matches(self, body: Body) -> bool:
        if self._encoded(body):
            return True
        doc = body.json_object()
        return doc is not None and "images" in doc

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        if self._encoded(body):
            return DecodedRequest(decode_image(body.raw, body.content_type, "image", image_decoder), self)
        doc = body.json()
        return DecodedRequest(base64_images(doc["images"], image_decoder), self, output=from_keys(doc, ""))


def base64_images(items: Any, image_decoder: Optional[DecodeImage]) -> list[np.ndarray]:
    """A JSON list of base64 PNG/JPEG strings (or one string): one checked batch each, in order."""
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
    return images
