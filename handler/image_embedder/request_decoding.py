"""One TorchServe request in, a checked batch of images out (or its refusal, in its format's form).

The one way in is `decode_batch` (TorchServe's rows and each request's headers): it starts the
batch's PNG/JPEG decoding in parallel, then `decode` picks each request's wire format once (wire/)
and hands it the body; the format builds the images with the checks in decoded_request and nothing
calls back up. The formats and their bodies are listed in docs/api.md; values become float32 later,
unscaled unless the settings ask for scale/mean/std.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence, Union

from .decoded_request import DecodedRequest, DecodeImage, Describe, Refusal
from .errors import RequestError, as_answer
from .image_decoding import ImageDecoder
from .output_options import from_headers
from .settings import EncoderSettings
from .wire import PLAIN, choose
from .wire.base import Body
from .wire.kserve_v2 import HEADER_LENGTH
from .wire.multipart import decode_multipart  # noqa: F401  (part of this module's interface)

logger = logging.getLogger(__name__)

Decoded = Union[DecodedRequest, Refusal, Describe]


def decode_batch(rows: Sequence[Optional[dict]], headers: Sequence[Mapping[str, Any]],
                 image_decoder: Optional[ImageDecoder], settings: EncoderSettings) -> list[Decoded]:
    """Each request of one TorchServe batch, decoded and checked on its own: its DecodedRequest, its
    Refusal or Describe. `headers[i]` are request i's headers, names lower-cased, with a multipart
    part's own headers as a dict under the part's name (as TorchServe records them)."""
    requests = [input_map(row or {}, request_headers) for row, request_headers in zip(rows, headers)]
    if image_decoder is not None:
        image_decoder.prefetch([row for row, _ in requests])  # this batch's PNG/JPEGs decode in parallel from here on
    decoded: list[Decoded] = []
    for idx, (row, request_headers) in enumerate(requests):
        try:
            decoded.append(decode(row, request_headers, image_decoder, settings))
        except Exception as exc:  # a decoder bug must still cost only this request
            logger.exception("decoding request %d failed", idx)
            decoded.append(Refusal(RequestError(500, "InternalError", f"decoding failed: {type(exc).__name__}: {exc}"), PLAIN))
    return decoded


def decode(row: dict, headers: Mapping[str, Any], image_decoder: Optional[DecodeImage],
           settings: EncoderSettings) -> Decoded:
    """One request: Describe for `describe: true`, else its images within the settings' limits, or the
    refusal in its format's form."""
    if str(headers.get("describe")).lower() == "true":
        return Describe()
    body = request_of(row, headers)
    wire = PLAIN
    try:
        wire = choose(body)
        request = wire.decode(body, image_decoder)
        if isinstance(request, Describe):
            return request
        check_request_limits(request, settings.max_images_per_request, settings.max_batch_pixels)
        output = request.output.over(from_headers(headers))  # the body's own terms win over the headers
    except RequestError as exc:
        return Refusal(as_answer(exc), wire)
    return replace(request, accept=body.header("accept"), output=output)


def input_map(row: dict, headers: Mapping[str, Any]) -> tuple[dict, Mapping[str, Any]]:
    """A request through TorchServe's gRPC inference API as REST would send it. TorchServe hands its
    input map over as the row, each entry a part without a Content-Type, and no HTTP headers (a REST
    request has Host at least): `data` is the body, and every other entry the header of its name
    (`accept`, `embedding-dtype`, `embedding-dimensions`, `describe`, `content-type`). Any other
    request comes back as it is."""
    if not row or not headers or any(not isinstance(value, dict) for value in headers.values()):
        return row, headers
    body = {key: value for key, value in row.items() if key in ("body", "data")}
    named = {str(key).lower(): bytes(value).decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
             for key, value in row.items() if key not in body}
    return body, named


def request_of(row: dict, headers: Mapping[str, Any]) -> Body:
    """The Body of one TorchServe row. multipart/form-data: TorchServe hands each part as its own key of
    `row`, with the part's Content-Type in the request headers under the part's name; anything else is
    one body, whose own recorded Content-Type (TorchServe's, for a body part) wins over the request's."""
    request_type = headers.get("content-type") if isinstance(headers.get("content-type"), str) else ""
    if request_type.lower().startswith("multipart/"):
        parts = [(str(name), value, _part_type(headers, name)) for name, value in row.items()]
        return Body(None, request_type, headers, parts)
    part_types = (_part_type(headers, name) for name in ("body", "data", *row.keys()))
    content_type = next((t for t in part_types if t), request_type)
    return Body(request_body(row), content_type, headers)


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


def decode_request(body: Any, content_type: str = "", image_decoder: Optional[DecodeImage] = None,
                   header_length: Optional[str] = None) -> DecodedRequest:
    """One body, outside TorchServe: the content type, else the bytes themselves, pick the format.
    `header_length` is the Inference-Header-Content-Length header (a KServe v2 binary request).
    Raises the RequestError a server would answer."""
    headers = {} if header_length is None else {HEADER_LENGTH: header_length}
    request = Body(body, content_type, headers)
    return choose(request).decode(request, image_decoder)


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
