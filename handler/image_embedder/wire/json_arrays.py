"""JSON arrays: `{"data": nested list}` or a bare nested list, one image (C,H,W) or a batch (N,C,H,W);
`embedding_dtype` and `dimensions` beside `data` choose the answer's vectors (output_options)."""
from __future__ import annotations

from typing import Optional

from ..decoded_request import DecodedRequest, DecodeImage, check_images, json_numbers
from ..output_options import from_keys
from .base import Body, WireFormat


class JsonArrays(WireFormat):
    name = "data"

    def matches(self, body: Body) -> bool:
        doc = body.json_object()
        return (doc is not None and "data" in doc) or (body.is_json() and isinstance(body.json(), list))

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        doc = body.json()
        where, values = ("data", doc["data"]) if isinstance(doc, dict) else ("body", doc)
        return DecodedRequest([check_images(json_numbers(values, where), where)], self, output=from_keys(doc, ""))
