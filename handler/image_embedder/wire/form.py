"""A form body (application/x-www-form-urlencoded, curl's default for --data): refused with the fix.

TorchServe parses such a body as a form before the handler sees it, so no image or JSON survives."""
from __future__ import annotations

from typing import Optional

from ..decoded_request import DecodedRequest, DecodeImage
from ..errors import RequestError
from .base import Body, WireFormat

FORM_TYPE = "application/x-www-form-urlencoded"


class FormBody(WireFormat):
    name = "form"

    def matches(self, body: Body) -> bool:
        return body.content_type == FORM_TYPE

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        raise RequestError(
            415, "UnsupportedMediaType",
            "Content-Type application/x-www-form-urlencoded (curl's default for --data) can't carry an image or "
            "JSON: TorchServe parses it as a form and the body is lost; send it again with "
            "-H 'Content-Type: application/json' (JSON), application/x-npy (.npy) or --data-binary with "
            "image/png, image/jpeg",
        )
