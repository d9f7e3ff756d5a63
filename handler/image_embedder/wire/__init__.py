"""The wire formats, in the order they are tried: the first whose `matches` says yes reads the request
and writes its answer. A new format is one module and one line here.

Order matters where two could match: a form body is refused before anything reads it; the OpenAI-style
route and KServe v2's Inference-Header-Content-Length are explicit, so they come before the formats
that sniff; .npy's magic wins over a Content-Type naming an image; the JSON forms are told apart by
their top-level key.
"""
from __future__ import annotations

from ..errors import RequestError, bad_request
from .base import NOT_JSON, Body, WireFormat
from .form import FormBody
from .images import EncodedImages
from .json_arrays import JsonArrays
from .kserve_v1 import KServeV1
from .kserve_v2 import KServeV2
from .multipart import Multipart
from .npy import NpyArrays
from .openai_embeddings import OpenAIEmbeddings

FORMATS: tuple[WireFormat, ...] = (
    FormBody(),
    OpenAIEmbeddings(),
    KServeV2(),
    Multipart(),
    NpyArrays(),
    EncodedImages(),
    KServeV1(),
    JsonArrays(),
)
PLAIN: WireFormat = next(f for f in FORMATS if f.name == "data")  # a refusal before any format is known


def by_name(name: str) -> WireFormat:
    """The registered format called `name`."""
    for wire in FORMATS:
        if wire.name == name:
            return wire
    raise ValueError(f"no wire format {name!r}; the formats are {[f.name for f in FORMATS]}")


def choose(body: Body) -> WireFormat:
    """The format `body` is written in; a RequestError (plain form) naming what was sent when none is."""
    for wire in FORMATS:
        if wire.matches(body):
            return wire
    raise unmatched(body)


def unmatched(body: Body) -> RequestError:
    """Why no format reads `body`."""
    if body.empty:
        return bad_request("request body is empty; send .npy bytes or a JSON body", "EmptyBody")
    if body.raw is None and not isinstance(body.payload, (dict, list)):
        return bad_request(f"unsupported body of type {type(body.payload).__name__}", "InvalidBody")
    try:
        doc = body.json()
    except RequestError as exc:
        return exc
    if isinstance(doc, dict):
        return bad_request(
            f'JSON body has keys {sorted(doc)[:10]}; expected "data", "images", "instances" (KServe v1), '
            '"inputs" (KServe v2) or "input" (OpenAI-style)',
            "InvalidJson",
        )
    if doc is not NOT_JSON:
        return bad_request(f"JSON body must be an object, got {type(doc).__name__}", "InvalidJson")
    return bad_request(
        f"cannot decode a body of {len(body.raw)} bytes with Content-Type {body.content_type or 'unset'!r}: "
        "send .npy (application/x-npy) or JSON (application/json)",
        "UnsupportedMediaType",
    )
