"""Answers of a scripted stand-in server (an http.server handler), for client tests without TorchServe."""
from __future__ import annotations

from typing import Optional

import numpy as np

from image_embedder_testkit.bodies import npy_bytes


def scripted_reply(handler, status: int, body: bytes = b"", content_type: str = "",
                   headers: Optional[dict] = None) -> None:
    """Answer one request of a scripted stand-in server (http.server handler) with `body`."""
    handler.send_response(status)
    if content_type:
        handler.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def scripted_embeddings(handler, n: int) -> None:
    """A stand-in server's good answer: (n, 2) embeddings of 7s as .npy."""
    scripted_reply(handler, 200, npy_bytes(np.full((n, 2), 7, np.float32)), "application/x-npy")
