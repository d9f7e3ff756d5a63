"""TorchServe's gRPC inference API (`Predictions`, inference.proto) without generated code: the two
messages written out in protobuf's wire format, for grpcio's generic unary call. So gRPC needs grpcio
alone (no protobuf, no grpcio-tools, whose protobuf pin clashes with KServe's)."""
from __future__ import annotations

METHOD = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
MAX_MESSAGE = 128 * 1024 * 1024  # config.properties' max_request_size / max_response_size
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): key, length, bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predictions_request(model: str, inputs: dict[str, bytes], version: str = "") -> bytes:
    """PredictionsRequest{model_name = 1, model_version = 2, map<string, bytes> input = 3}."""
    message = _field(1, model.encode()) + (_field(2, version.encode()) if version else b"")
    return message + b"".join(_field(3, _field(1, key.encode()) + _field(2, value)) for key, value in inputs.items())


def prediction(message: bytes) -> bytes:
    """PredictionResponse's `prediction` (field 1); the other fields are skipped."""
    pos, found = 0, b""
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(message, pos)
        elif wire == 2:
            length, pos = _read_varint(message, pos)
            if number == 1:
                found = message[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"PredictionResponse: unexpected wire type {wire} of field {number}")
    return found


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
