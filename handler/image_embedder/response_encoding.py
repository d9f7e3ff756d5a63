"""Embeddings out, in the protocol the request came in, serialized once (compact JSON, .npy or KServe v2
binary tensor data)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import numpy as np

from . import kserve_v2
from .decoded_request import DecodedRequest, Describe
from .errors import RequestError
from .npy_codec import write_npy

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
BINARY_TYPE = "application/octet-stream"  # a KServe v2 JSON header followed by tensor bytes


@dataclass(frozen=True)
class EncodedResponse:
    """One request's answer: body, Content-Type and any other response headers."""

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class BatchResults(list):
    """One batch's results, request by request: embeddings (N, D), a RequestError in its protocol's form,
    or Describe. `requests` holds what each answers (its DecodedRequest, else its refusal or Describe):
    the protocol and Accept header its embeddings are encoded for."""

    def __init__(self, results: Iterable[Union[np.ndarray, RequestError, Describe]],
                 requests: Iterable[Union[DecodedRequest, RequestError, Describe]]) -> None:
        super().__init__(results)
        self.requests = list(requests)


def wants_npy(accept: Optional[str]) -> bool:
    """True when the Accept header asks for .npy."""
    return bool(accept) and any(
        part.split(";")[0].strip().lower() in (NPY_TYPE, "application/npy") for part in accept.split(",")
    )


def encode_response(embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
    """The answer for one request's (N, D) float32 embeddings: .npy when Accept asks for it, else the
    request's own protocol."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if wants_npy(request.accept):
        return EncodedResponse(write_npy(embeddings), NPY_TYPE)
    if request.protocol == "kserve_v2":
        body, headers = kserve_v2.encode(embeddings, model_name, request.request_id, request.binary_output)
        return EncodedResponse(body, BINARY_TYPE if request.binary_output else JSON_TYPE, headers)
    if request.protocol == "kserve_v1":
        doc: dict = {"predictions": embeddings.tolist()}
    else:
        doc = {"embeddings": embeddings.tolist()}
    return EncodedResponse(json.dumps(doc, separators=(",", ":")).encode("utf-8"), JSON_TYPE)
