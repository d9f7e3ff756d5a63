"""KServe v2 (Open Inference Protocol) requests and responses, JSON and binary.

Written against the binary tensor data extension, as specified by
- KServe: https://kserve.github.io/website/latest/modelserving/data_plane/binary_tensor_data_extension
- Triton: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md

The wire format, once:
- a binary request is a JSON header followed by raw tensor bytes; the `Inference-Header-Content-Length`
  HTTP header gives the JSON header's length in bytes;
- an input sent as binary carries `parameters.binary_data_size` (bytes) and no `data`; binary inputs'
  bytes follow the header back to back, in the order the inputs are listed;
- tensor bytes are little-endian, row-major, without padding; a BYTES element is a 4-byte little-endian
  unsigned length followed by that many bytes (here: one encoded PNG/JPEG image each; in JSON form a
  base64 string each);
- an output is returned as binary when its `parameters.binary_data` is true, or, when it does not say,
  when the request's `parameters.binary_data_output` is true; a binary output carries
  `parameters.binary_data_size`, and the response's JSON length goes in `Inference-Header-Content-Length`.

Accepted datatypes: UINT8, FP16, FP32, FP64 (read as that dtype) and BYTES (encoded images); any other
is refused with its name. Every size is checked against the body before anything is allocated.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Optional

import numpy as np

from ..decoded_request import DecodeImage, DecodedRequest, base64_bytes, check_images, decode_image, json_numbers
from ..errors import RequestError, bad_request
from ..output_options import from_keys
from .base import JSON_TYPE, Body, EncodedResponse, WireFormat

HEADER_LENGTH = "inference-header-content-length"  # request and response header, compared lower-case
BINARY_TYPE = "application/octet-stream"  # an answer's JSON header followed by tensor bytes
OUTPUT_NAME = "embedding"
TENSOR_DTYPES = {"UINT8": np.dtype("<u1"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
SUPPORTED = (*TENSOR_DTYPES, "BYTES")
OUTPUT_DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT8": np.dtype("i1"), "UINT8": np.dtype("u1")}
KIND = "InvalidKServeV2"


class KServeV2(WireFormat):
    """Requests with Inference-Header-Content-Length (binary) or a JSON `{"inputs": [...]}`. A refusal's
    body also carries `error` (the message), where v2 clients (tritonclient's InferenceServerException)
    look for it."""

    name = "kserve_v2"

    def matches(self, body: Body) -> bool:
        if body.header(HEADER_LENGTH) is not None:
            return True
        doc = body.json_object()
        return doc is not None and "inputs" in doc

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        header_length = body.header(HEADER_LENGTH)
        if header_length is None or body.raw is None:  # JSON, or a binary request TorchServe parsed as JSON
            if body.payload is None:
                raise bad_request("request body is empty; send a KServe v2 JSON header", "EmptyBody")
            payload, binary = body.json(), (None if header_length is None else memoryview(b""))
        else:
            payload, binary = split_body(body.raw, header_length)
        return self._decoded(payload, binary, image_decoder)

    def _decoded(self, payload: Any, binary: Optional[memoryview], image_decoder: Optional[DecodeImage]) -> DecodedRequest:
        if not isinstance(payload, dict):
            raise bad_request(f"KServe v2 header must be a JSON object, got {type(payload).__name__}", KIND)
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise bad_request('KServe v2 body needs a non-empty "inputs" list', KIND)
        offset = 0
        images: list[np.ndarray] = []
        for i, tensor in enumerate(inputs):
            batches, used = _tensor(tensor, f"inputs[{i}]", binary, offset, image_decoder)
            images.extend(batches)
            offset += used
        available = len(binary) if binary is not None else 0
        if offset != available:
            raise bad_request(
                f"the binary section holds {available} bytes but the inputs' binary_data_size add up to {offset}", KIND
            )
        request_id = payload.get("id")
        return DecodedRequest(images, self, request_id if isinstance(request_id, str) else None,
                              options={"binary_output": _binary_output(payload)},
                              output=from_keys(payload.get("parameters"), "parameters."))

    def answer(self, embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
        binary = bool(request.options.get("binary_output"))
        body, headers = encode(embeddings, model_name, request.request_id, binary)
        return EncodedResponse(body, BINARY_TYPE if binary else JSON_TYPE, headers)

    def refuse(self, error: RequestError) -> EncodedResponse:
        doc = {**error.to_dict(), "error": error.message}
        return EncodedResponse(json.dumps(doc).encode("utf-8"), JSON_TYPE)


def split_body(body: bytes | bytearray, header_length: str) -> tuple[Any, memoryview]:
    """(parsed JSON header, the binary section after it) of a binary request."""
    try:
        length = int(str(header_length).strip())
    except ValueError:
        raise bad_request(f"Inference-Header-Content-Length {header_length!r} is not an integer", KIND) from None
    if length < 0 or length > len(body):
        raise bad_request(
            f"Inference-Header-Content-Length is {length} but the body holds {len(body)} bytes; it must be the "
            "length of the JSON header at the start of the body",
            KIND,
        )
    view = memoryview(body)
    try:
        header = json.loads(bytes(view[:length]))
    except RecursionError:
        raise bad_request("the JSON header is nested too deeply", KIND) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(
            f"the first {length} bytes (Inference-Header-Content-Length) are not a JSON header: {exc}", KIND
        ) from None
    return header, view[length:]


def _non_negative_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{where} must be a non-negative integer, got {value!r}", KIND)
    return value


def _flat(data: Any, where: str) -> list:
    """A nested JSON list, flattened row-major."""
    if not isinstance(data, list):
        raise bad_request(f"{where} must be a list, got {type(data).__name__}", KIND)
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _numbers(data: Any, dtype: np.dtype, count: int, where: str) -> np.ndarray:
    """JSON `data` of a numeric datatype: `count` values, each one the datatype holds."""
    values = json_numbers(data, where, np.float64)
    if values.size != count:
        raise bad_request(f"{where}: shape needs {count} values but data holds {values.size}", KIND)
    if dtype == np.uint8 and values.size and (
        not np.isfinite(values).all() or (values % 1).any() or values.min() < 0 or values.max() > 255
    ):
        raise bad_request(f"{where} has values outside the integers 0..255 that UINT8 holds", "InvalidJson")
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype.newbyteorder("="))


def _bytes_elements(raw: memoryview, count: int, where: str) -> list[bytes]:
    """`count` BYTES elements, each a 4-byte little-endian length and its bytes, filling `raw` exactly."""
    items, pos = [], 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise bad_request(f"{where}: element {i} has no 4-byte length (the tensor's bytes end at {len(raw)})", KIND)
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise bad_request(
                f"{where}: element {i} claims {size} bytes but only {len(raw) - pos} remain in its binary_data_size", KIND
            )
        items.append(bytes(raw[pos: pos + size]))
        pos += size
    if pos != len(raw):
        raise bad_request(f"{where}: {count} elements use {pos} bytes but binary_data_size is {len(raw)}", KIND)
    return items


def _base64_elements(data: Any, count: int, where: str) -> list[bytes]:
    items = _flat(data, where)
    if len(items) != count:
        raise bad_request(f"{where} holds {len(items)} elements but the shape needs {count}", KIND)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise bad_request(f"{where}[{i}] must be a base64 string, got {type(item).__name__}", KIND)
        out.append(base64_bytes(item, f"{where}[{i}]"))
    return out


def _binary_output(payload: dict) -> bool:
    """Whether the embedding goes back as binary: its requested output says so, else the request does."""
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request(f"parameters must be an object, got {type(parameters).__name__}", KIND)
    default = parameters.get("binary_data_output", False) is True
    outputs = payload.get("outputs")
    if outputs is None:
        return default
    if not isinstance(outputs, list):
        raise bad_request(f"outputs must be a list, got {type(outputs).__name__}", KIND)
    binary = default
    for i, output in enumerate(outputs):
        name = output.get("name") if isinstance(output, dict) else None
        if name != OUTPUT_NAME:
            raise bad_request(f"outputs[{i}] asks for {name!r}; this model has one output, {OUTPUT_NAME!r}", KIND)
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"outputs[{i}].parameters must be an object, got {type(parameters).__name__}", KIND)
        flag = parameters.get("binary_data")
        if flag is not None:
            binary = flag is True
    return binary


def _shape_and_datatype(tensor: Any, where: str) -> tuple[list[int], str]:
    """An input's declared shape (positive integers) and datatype (one this server reads)."""
    if not isinstance(tensor, dict):
        raise bad_request(f"{where} must be an object with name, shape, datatype and data", KIND)
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad_request(f"{where}.shape must be a list of integers, got {shape!r}", KIND)
    if any(d <= 0 for d in shape):
        raise bad_request(f"{where}.shape {shape} has a zero or negative dimension", KIND)
    if datatype not in SUPPORTED:
        raise bad_request(
            f"{where}.datatype {datatype!r} is not supported; use one of {', '.join(SUPPORTED)}", "UnsupportedDtype"
        )
    return shape, datatype


def _binary_data(tensor: dict, where: str, section: Optional[memoryview], offset: int) -> Optional[memoryview]:
    """An input's bytes in the binary section (from `offset`), or None when it carries JSON `data`."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}.parameters must be an object", KIND)
    if "binary_data_size" not in parameters:
        if "data" not in tensor:
            raise bad_request(f"{where} has neither data nor parameters.binary_data_size", KIND)
        return None
    size = _non_negative_int(parameters["binary_data_size"], f"{where}.parameters.binary_data_size")
    if "data" in tensor:
        raise bad_request(f"{where} has both data and binary_data_size; send one", KIND)
    if section is None:
        raise bad_request(
            f"{where} has binary_data_size but the request has no Inference-Header-Content-Length header "
            "saying where its binary section starts", KIND,
        )
    if offset + size > len(section):
        raise bad_request(
            f"{where}.binary_data_size {size} runs past the body: {len(section) - offset} bytes remain "
            "after the JSON header and the inputs before it", KIND,
        )
    return section[offset: offset + size]


def _tensor(tensor: Any, where: str, section: Optional[memoryview], offset: int,
            image_decoder: Optional[DecodeImage]) -> tuple[list[np.ndarray], int]:
    """One input's image batches, and how many bytes of the binary section it used (from `offset`)."""
    shape, datatype = _shape_and_datatype(tensor, where)
    count = math.prod(shape)
    raw = _binary_data(tensor, where, section, offset)
    used = 0 if raw is None else len(raw)
    if datatype == "BYTES":
        items = _bytes_elements(raw, count, where) if raw is not None else _base64_elements(tensor["data"], count, f"{where}.data")
        return [a for j, item in enumerate(items) for a in decode_image(item, "", f"{where}[{j}]", image_decoder)], used
    dtype = TENSOR_DTYPES[datatype]
    if raw is None:
        array = _numbers(tensor["data"], dtype, count, f"{where}.shape {shape}")
    elif len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes but binary_data_size "
            f"is {len(raw)}", KIND,
        )
    else:
        array = np.frombuffer(raw, dtype=dtype, count=count)
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
    return [check_images(array.reshape(shape), where)], used


def encode(embeddings: np.ndarray, model_name: str, request_id: Optional[str], binary: bool) -> tuple[bytes, dict[str, str]]:
    """The response body for (N, D) embeddings (a dtype of OUTPUT_DATATYPES; packed binary vectors are
    UINT8) and the headers it needs (the JSON length when binary)."""
    datatype = next(name for name, dtype in OUTPUT_DATATYPES.items() if dtype == embeddings.dtype.newbyteorder("<"))
    output: dict[str, Any] = {"name": OUTPUT_NAME, "shape": list(embeddings.shape), "datatype": datatype}
    tail = b""
    if binary:
        tail = np.ascontiguousarray(embeddings, dtype=OUTPUT_DATATYPES[datatype]).tobytes()
        output["parameters"] = {"binary_data_size": len(tail)}
    else:
        output["data"] = embeddings.ravel().tolist()
    body: dict[str, Any] = {"model_name": model_name, "outputs": [output]}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode("utf-8")
    if not binary:
        return header, {}
    return header + tail, {"Inference-Header-Content-Length": str(len(header))}
