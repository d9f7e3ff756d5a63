"""Embeddings out, each request's in the wire format it came in (wire/), serialized once."""
from __future__ import annotations

from typing import Iterable, Union

import numpy as np

from .decoded_request import DecodedRequest, Describe, Refusal
from .wire.base import JSON_TYPE, NPY_TYPE, EncodedResponse, wants_npy  # noqa: F401  (this module's interface)


class BatchResults(list):
    """One batch's results, request by request: embeddings (N, D), a Refusal or Describe. `requests`
    holds what each answers (its DecodedRequest, else its Refusal or Describe): the format and Accept
    header its embeddings are encoded for."""

    def __init__(self, results: Iterable[Union[np.ndarray, Refusal, Describe]],
                 requests: Iterable[Union[DecodedRequest, Refusal, Describe]]) -> None:
        super().__init__(results)
        self.requests = list(requests)


def encode_response(embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
    """The answer for one request's (N, D) float32 embeddings: .npy when Accept asks for it, else the
    request's own format."""
    return request.wire.encode(embeddings, request, model_name)
