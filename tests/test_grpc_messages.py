"""The gRPC messages (image_embedder_client.grpc_messages) in protobuf's wire format: compared with
bytes written out here from the encoding spec for TorchServe's inference.proto (key = field number
<< 3 | wire type, varint lengths; no protobuf installed to ask). That a real TorchServe reads them and
answers right is tests/test_bench_smoke.py's transport run."""
from __future__ import annotations

import pytest

from image_embedder_client.grpc_messages import _varint, prediction, predictions_request


@pytest.mark.parametrize("value, encoded", [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"),
                                            (300, b"\xac\x02"), (2**21, b"\x80\x80\x80\x01")])
def test_varints_follow_protobufs_examples(value, encoded):
    assert _varint(value) == encoded  # 300 -> ac 02 is the protobuf encoding guide's own example


def test_a_predictions_request_lays_out_name_version_and_the_input_map():
    message = predictions_request("encoder", {"data": b"\x93NUMPY"}, version="1.0")
    entry = b"\x0a\x04data" + b"\x12\x06\x93NUMPY"  # map entry: key = 1, value = 2
    assert message == b"\x0a\x07encoder" + b"\x12\x031.0" + b"\x1a" + bytes([len(entry)]) + entry


def test_a_long_input_gets_a_multi_byte_length():
    body = bytes(300)
    message = predictions_request("m", {"data": body})
    assert message.endswith(b"\x12\xac\x02" + body)


def test_the_prediction_is_read_past_other_fields():
    answer = b'{"embeddings": [[1.0]]}'
    status = b"\x08\x05\x12\x03bad"  # google.rpc.Status{code: 5, message: "bad"}
    message = b"\x12\x02s1" + b"\x1a" + bytes([len(status)]) + status + b"\x0a" + bytes([len(answer)]) + answer
    assert prediction(message) == answer
    assert prediction(b"") == b""
    with pytest.raises(ValueError, match="wire type 5"):
        prediction(b"\x0d\x00\x00\x00\x00")
