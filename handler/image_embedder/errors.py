"""The two kinds of failure: a bad archive/setting (fails the load) and a bad request (fails one request)."""
from __future__ import annotations

import json


class ConfigError(ValueError):
    """The archive, its settings, its model file or its weights are wrong; the worker must not start."""


class RequestError(Exception):
    """One request is bad; it gets `status` and a JSON body, the rest of its batch is untouched."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def to_json(self) -> str:
        """The response body: {"code", "type", "message"}."""
        return json.dumps({"code": self.status, "type": self.kind, "message": self.message})


def bad_request(message: str, kind: str = "BadRequest") -> RequestError:
    """A 400 for input that cannot be decoded or has the wrong form."""
    return RequestError(400, kind, message)
