"""TorchServe's own Python side, in process: TsModelLoader over an unpacked .mar, Service.predict,
and the binary response parsed back into per-request status, content type and body.

This is what a worker does between the frontend's socket and our handler, minus the socket.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader

METRICS_CONFIG = os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")


@dataclass
class Request:
    body: Any
    content_type: str = "application/x-npy"
    headers: dict = field(default_factory=dict)
    name: str = "body"


@dataclass
class GrpcRequest:
    """A request as TorchServe's gRPC inference API hands it over: each input map entry a parameter
    without a Content-Type, and no headers."""
    inputs: dict


@dataclass
class Response:
    status: int
    content_type: Optional[str]
    body: bytes
    phrase: str = ""
    headers: dict = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def _encode_value(value: Any, content_type: str) -> Any:
    """What the worker's protocol layer hands the handler: JSON decoded, text as str, else bytearray."""
    if content_type == "application/json" and isinstance(value, (bytes, bytearray)):
        try:
            return json.loads(value.decode("utf-8"))
        except Exception:
            return bytearray(value)
    if isinstance(value, (bytes, bytearray)):
        return bytearray(value)
    return value


def _take_ours() -> dict:
    """Remove this project's modules (the handler, image_embedder.*) from sys.modules; return them."""
    ours = {name: module for name, module in sys.modules.items()
            if name == "encoder_handler" or name == "image_embedder" or name.startswith("image_embedder.")}
    for name in ours:
        del sys.modules[name]
    return ours


class InProcessModel:
    """A loaded archive; `predict` runs one TorchServe batch through Service.predict."""

    def __init__(self, mar_path: str, batch_size: int = 8, model_name: str = "encoder") -> None:
        self.model_dir = tempfile.mkdtemp(prefix="mar-unpacked-")
        weakref.finalize(self, shutil.rmtree, self.model_dir, True)  # at the latest when the interpreter exits
        with zipfile.ZipFile(mar_path) as z:
            z.extractall(self.model_dir)
        with open(os.path.join(self.model_dir, "MAR-INF", "MANIFEST.json")) as f:
            handler = json.load(f)["model"]["handler"]
        sys.path.insert(0, self.model_dir)
        installed = _take_ours()  # each archive brings its own copy, as each worker would import it
        try:
            metrics = MetricsCacheYamlImpl(config_file_path=METRICS_CONFIG)
            metrics.initialize_cache()
            self.service = TsModelLoader().load(model_name, self.model_dir, handler, None, batch_size,
                                                metrics_cache=metrics)
        finally:
            sys.path.remove(self.model_dir)
            _take_ours()  # the handler holds its copy; later imports in the tests get the installed one
            sys.modules.update(installed)
        self.service.set_cl_socket(None)
        self._counter = 0

    @property
    def handler(self):
        """The handler instance TorchServe loaded (its `encoder`, `cores`, ...), as a worker holds it."""
        return self.service._entry_point.__self__

    def predict(self, requests: list[Union[Request, GrpcRequest]]) -> list[Response]:
        batch = []
        for req in requests:
            self._counter += 1
            if isinstance(req, GrpcRequest):
                batch.append({"requestId": f"req-{self._counter}".encode(), "headers": [],
                              "parameters": [{"name": name, "contentType": "", "value": bytearray(value)}
                                             for name, value in req.inputs.items()]})
                continue
            headers = [{"name": k.encode(), "value": str(v).encode()} for k, v in req.headers.items()]
            headers.append({"name": b"Content-Type", "value": req.content_type.encode()})
            batch.append({
                "requestId": f"req-{self._counter}".encode(),
                "parameters": [{"name": req.name, "contentType": req.content_type,
                                "value": _encode_value(req.body, req.content_type)}],
                "headers": headers,
            })
        return parse_predict_response(self.service.predict(batch), len(requests))


def parse_predict_response(msg: bytes, count: int) -> list[Response]:
    """Decode otf_message_handler.create_predict_response's frame."""
    pos = 0

    def take_int() -> int:
        nonlocal pos
        (value,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        return value

    def take_bytes() -> bytes:
        nonlocal pos
        n = take_int()
        out = bytes(msg[pos: pos + n])
        pos += n
        return out

    batch_code = take_int()
    batch_message = take_bytes().decode()
    responses = []
    for _ in range(count):
        take_bytes()  # request id
        content_type = take_bytes().decode() or None
        code = take_int()
        phrase = take_bytes().decode()
        headers = {}
        for _ in range(take_int()):
            key = take_bytes().decode()
            headers[key] = take_bytes().decode()
        body = take_bytes()
        if batch_code != 200 and body == b"error":
            code, body = batch_code, batch_message.encode()
        responses.append(Response(code, content_type, body, phrase, headers))
    return responses
