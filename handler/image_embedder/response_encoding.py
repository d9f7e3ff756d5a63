"""Embeddings out, in the protocol the request came in, serialized once (compact JSON or .npy)."""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from .npy_codec import write_npy
from .request_decoding import DecodedRequest

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"


def wants_npy(accept: Optional[str]) -> bool:
    """True when the Accept header asks for .npy."""
    return bool(accept) and any(
        part.split(";")[0].strip().lower() in (NPY_TYPE, "application/npy") for part in accept.split(",")
    )


def encode_response(
    embeddings: np.ndarray, request: DecodedRequest, model_name: str, accept: Optional[str] = None
) -> tuple[bytes, str]:
    """The response body and its Content-Type for one request's (N, D) float32 embeddings."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if wants_npy(accept):
        return write_npy(embeddings), NPY_TYPE
    if request.protocol == "kserve_v2":
        body: dict = {
            "model_name": model_name,
            "outputs": [{
                "name": "embedding",
                "shape": list(embeddings.shape),
                "datatype": "FP32",
                "data": embeddings.ravel().tolist(),
            }],
        }
        if request.request_id is not None:
            body["id"] = request.request_id
    elif request.protocol == "kserve_v1":
        body = {"predictions": embeddings.tolist()}
    else:
        body = {"embeddings": embeddings.tolist()}
    return json.dumps(body, separators=(",", ":")).encode("utf-8"), JSON_TYPE
