"""The client's other way to the server: TorchServe's gRPC inference API (`grpc://host:7070`, or
`grpcs://` where TorchServe runs it over TLS: `enable_grpc_ssl=true`, the HTTPS certificate).

Over gRPC a request is its input map: `data` is the body, and every other entry is read by the server
as the header of its name (accept, embedding-dtype, embedding-dimensions, describe). There is no
multipart, so a batch goes as runs: arrays of one shape as one `.npy`, encoded images as
`{"images": [base64, ...]}`. TorchServe 0.12 answers every handler answer with gRPC status OK, a
refusal included: the answer is then the server's JSON error (`{"code": 400, "type", "message"}`).
TorchServe's own refusals are gRPC errors: PERMISSION_DENIED for a key, INTERNAL "Worker died." for
a batch lost with its worker, UNAVAILABLE for no worker or a full queue.

Needs grpcio (`pip install "./client[grpc]"`); the messages are written by hand (grpc_messages.py).
"""
from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .grpc_messages import CHANNEL_OPTIONS, METHOD, prediction, predictions_request

# what grpcio says when the TLS handshake fails: never retried (the same certificate fails again)
HANDSHAKE_MARKERS = ("handshake", "Handshake", "CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
# gRPC codes worth sending again: the server unreachable or restarting, no worker or a full queue
# (UNAVAILABLE), out of memory (RESOURCE_EXHAUSTED), no answer within the timeout.
RETRIABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class Failure:
    """A call that did not answer: gRPC's code name and details."""

    code: str
    details: str


def refusal(answer: bytes) -> Optional[tuple[int, str]]:
    """(status, text) when the answer is the server's JSON error, else None."""
    if not answer.startswith(b"{"):
        return None
    try:
        doc = json.loads(answer)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("code"), int) and "message" in doc:
        return doc["code"], answer.decode("utf-8", "replace")
    return None


def batch_runs(batch: Sequence[Union[np.ndarray, bytes]], npy: Callable[[np.ndarray], bytes]) -> list[dict[str, bytes]]:
    """The input map of each request, in order: consecutive arrays of one shape and dtype as one `.npy`
    (`npy` writes it), consecutive encoded images as one `{"images": [...]}`."""
    runs: list[list[Union[np.ndarray, bytes]]] = []
    for item in batch:
        last = runs[-1][-1] if runs else None
        same = (isinstance(item, np.ndarray) and isinstance(last, np.ndarray)
                and (item.shape, item.dtype) == (last.shape, last.dtype)) or \
               (not isinstance(item, np.ndarray) and last is not None and not isinstance(last, np.ndarray))
        if same:
            runs[-1].append(item)
        else:
            runs.append([item])
    out = []
    for run in runs:
        if isinstance(run[0], np.ndarray):
            out.append({"data": npy(np.stack(run))})
        else:
            doc = {"images": [base64.b64encode(item).decode("ascii") for item in run]}
            out.append({"data": json.dumps(doc).encode(), "content-type": b"application/json"})
    return out


class GrpcTransport:
    """One channel to `target` (host:port), shared by every thread (HTTP/2 multiplexes the calls);
    `tls`: checked against `verify` (True: grpcio's trusted roots, or the path of a CA's PEM file)."""

    def __init__(self, target: str, model: str, tls: bool = False, verify: Union[bool, str] = True) -> None:
        try:
            import grpc
        except ImportError as exc:
            raise ImportError(f"grpc://{target} needs grpcio: pip install \"./client[grpc]\" (or use http://)") from exc
        self.grpc, self.target, self.model = grpc, target, model
        self.credentials = None
        if tls:
            if verify is False or (isinstance(verify, str) and not os.path.isfile(verify)):
                raise ValueError(f"grpcs://{target} with verify={verify!r}: gRPC checks the server's certificate "
                                 "against a CA's PEM file (verify=its path) or its own trusted roots (verify=True)")
            roots = None
            if isinstance(verify, str):
                with open(verify, "rb") as f:
                    roots = f.read()
            self.credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        self._lock = threading.Lock()
        self._channel: Any = None
        self._call: Any = None

    def call(self, inputs: dict[str, bytes], token: Optional[str], timeout: float) -> Union[bytes, Failure]:
        """One Predictions call: the answer's bytes, or the Failure gRPC reported."""
        with self._lock:
            if self._channel is None:
                self._channel = (self.grpc.secure_channel(self.target, self.credentials, options=CHANNEL_OPTIONS)
                                 if self.credentials else self.grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS))
                self._call = self._channel.unary_unary(METHOD)  # bytes in, bytes out
            call = self._call
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            return prediction(call(predictions_request(self.model, inputs), metadata=metadata, timeout=timeout))
        except self.grpc.RpcError as exc:
            return Failure(exc.code().name, exc.details() or "")

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._call = self._channel, None, None
        if channel is not None:
            channel.close()
