"""What every wire format shares: the request as the formats see it (Body), the answer (EncodedResponse),
and the WireFormat base class each format implements once.

A wire format owns both directions of one way of talking to the server, errors included (LitServe's
`LitSpec`): `matches` says whether a request is written in it, `decode` reads its images and output
options, `encode` writes the embeddings back, `refuse` writes a RequestError in its error form, and
`describe` writes the `describe: true` answer. The registry (wire/__init__.py) picks one per request.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from ..decoded_request import DecodedRequest, DecodeImage
from ..errors import RequestError, bad_request
from ..npy_codec import NPY_MAGIC, write_npy

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
NPY_CONTENT_TYPES = (NPY_TYPE, "application/octet-stream", "application/npy")
NOT_JSON = object()  # Body.json() of a body that is not written as JSON


@dataclass(frozen=True)
class EncodedResponse:
    """One request's answer: body, Content-Type and any other response headers."""

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def json_answer(doc: Any) -> EncodedResponse:
    """`doc` as compact JSON."""
    return EncodedResponse(json.dumps(doc, separators=(",", ":")).encode("utf-8"), JSON_TYPE)


def wants_npy(accept: Optional[str]) -> bool:
    """True when the Accept header asks for .npy."""
    return bool(accept) and any(
        part.split(";")[0].strip().lower() in (NPY_TYPE, "application/npy") for part in accept.split(",")
    )


@dataclass
class Body:
    """One request as the wire formats see it.

    `payload` is what TorchServe handed over: bytes (bytearray), text, or the dict/list it already parsed
    from a JSON body; `parts` are a multipart body's (name, value, Content-Type), in order. `content_type`
    is the media type alone, lower-case; `headers` are the request's, names lower-cased. A JSON body is
    parsed once, by the first format that asks (`json`)."""

    payload: Any
    content_type: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)
    parts: Optional[list[tuple[str, Any, str]]] = None
    _json: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.content_type = (self.content_type or "").split(";")[0].strip().lower()
        if isinstance(self.payload, str):
            self.payload = self.payload.encode("utf-8")

    def header(self, name: str) -> Optional[str]:
        """A request header as text (None when absent or a multipart part's dict)."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None

    @property
    def url_path(self) -> str:
        """The path after /predictions/<model>[/<version>]/, which TorchServe hands over as `url_path`."""
        return (self.header("url_path") or "").strip("/")

    @property
    def raw(self) -> Optional[bytes | bytearray]:
        """The body's bytes, or None when TorchServe parsed it (JSON) or it is multipart."""
        return self.payload if isinstance(self.payload, (bytes, bytearray)) else None

    @property
    def empty(self) -> bool:
        return self.payload is None or (self.raw is not None and len(self.raw) == 0)

    def json(self) -> Any:
        """The body's JSON (dict, list, ...), or NOT_JSON for a body not written as JSON (sent as .npy,
        or neither sent as JSON nor starting like it); raises InvalidJson for JSON that does not parse."""
        if self._json is None:
            self._json = self._parse()
        if isinstance(self._json, RequestError):
            raise self._json
        return self._json

    def is_json(self) -> bool:
        """Whether the body is JSON that parses."""
        try:
            return self.json() is not NOT_JSON
        except RequestError:
            return False

    def json_object(self) -> Optional[dict]:
        """The body's JSON object, or None (not JSON, not an object, or not parseable: no format matches)."""
        try:
            doc = self.json()
        except RequestError:
            return None
        return doc if isinstance(doc, dict) else None

    def _parse(self) -> Any:
        if isinstance(self.payload, (dict, list)):
            return self.payload
        raw = self.raw
        if raw is None or not raw or raw[:6] == NPY_MAGIC:
            return NOT_JSON
        first = bytes(raw[:64]).lstrip()[:1]
        if self.content_type in NPY_CONTENT_TYPES or not (self.content_type.endswith("json") or first in (b"{", b"[")):
            return NOT_JSON
        try:
            return json.loads(raw)
        except RecursionError:
            return bad_request("JSON body is nested too deeply", "InvalidJson")
        except (ValueError, UnicodeDecodeError) as exc:
            return bad_request(f"body is not valid JSON: {exc}", "InvalidJson")


class WireFormat:
    """One way of writing requests and answers. Subclasses set `name` and implement `matches`, `decode`
    and `answer`; they override `refuse` and `describe` when their errors or descriptions have a form of
    their own. Instances hold no state: one per format, in the registry."""

    name: str = ""

    def matches(self, body: Body) -> bool:
        """Whether `body` is written in this format (cheap; never raises)."""
        raise NotImplementedError

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        """The request's images, checked, and its output options; a RequestError for a bad request."""
        raise NotImplementedError

    def encode(self, embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
        """The answer for one request's (N, D) embeddings, in the dtype its output options gave them: .npy
        when its Accept header asks for it (whatever the format), else this format's own answer."""
        embeddings = np.asarray(embeddings)
        if wants_npy(request.accept):
            return EncodedResponse(write_npy(embeddings), NPY_TYPE)
        return self.answer(embeddings, request, model_name)

    def answer(self, embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
        """This format's answer: `{"embeddings": [[...], ...]}` unless a format says otherwise."""
        return json_answer({"embeddings": embeddings.tolist()})

    def refuse(self, error: RequestError) -> EncodedResponse:
        """The body of a refusal: `{"code", "type", "message"}` unless a format says otherwise."""
        return EncodedResponse(error.to_json().encode("utf-8"), JSON_TYPE)

    def describe(self, description: dict, model_name: str) -> EncodedResponse:
        """The answer to `describe: true`: what is served."""
        return json_answer(description)

    def __repr__(self) -> str:
        return f"<wire format {self.name}>"
