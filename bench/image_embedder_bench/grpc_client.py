"""The bench's gRPC clients: TorchServe's inference API with the client library's messages
(image_embedder_client.grpc_messages), many threads, one channel each."""
from __future__ import annotations

from image_embedder_client.grpc_messages import CHANNEL_OPTIONS, METHOD, prediction, predictions_request

from .bench_client import RunResult, run_threads


def run_grpc_clients(target: str, model: str, body: bytes, key: str, clients: int, per_client: int,
                     timeout: float = 600.0) -> RunResult:
    """`clients` threads, each with its own channel to `target` (host:port), sending `per_client`
    Predictions of `body` as the input `data` (what the handler reads as a request's body)."""
    import grpc

    request = predictions_request(model, {"data": body})

    def open_sender():
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no (de)serializers

        def send() -> tuple[str | None, bytes]:
            try:
                return None, prediction(call(request, metadata=[("authorization", f"Bearer {key}")], timeout=timeout))
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()[:200]}", b""

        return send, channel.close

    return run_threads(open_sender, clients, per_client)
