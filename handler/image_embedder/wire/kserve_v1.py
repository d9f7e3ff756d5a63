"""KServe v1 (TensorFlow Serving's predict API): `{"instances": [...]}` in, `{"predictions": [...]}` out."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..decoded_request import DecodedRequest, DecodeImage, check_images, json_numbers
from .base import Body, EncodedResponse, WireFormat, json_answer


class KServeV1(WireFormat):
    name = "kserve_v1"

    def matches(self, body: Body) -> bool:
        doc = body.json_object()
        return doc is not None and "instances" in doc

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        instances = body.json()["instances"]
        return DecodedRequest([check_images(json_numbers(instances, "instances"), "instances")], self)

    def answer(self, embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
        return json_answer({"predictions": embeddings.tolist()})
