"""The two kinds of failure: a bad archive/setting (fails the load) and a bad request (fails one request)."""
from __future__ import annotations

import json
from typing import Optional


class ConfigError(ValueError):
    """The archive, its settings, its model file or its weights are wrong; the worker must not start."""


class RequestError(Exception):
    """One request is bad; it gets `status` and a JSON body, the rest of its batch is untouched."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def to_dict(self) -> dict:
        """{"code", "type", "message"}: the response body, unless a wire format writes its own form."""
        return {"code": self.status, "type": self.kind, "message": self.message}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def as_answer(error: RequestError) -> RequestError:
    """`error`, to be kept as a request's answer, with the tracebacks of its chain dropped.

    A traceback holds the frames it passed through and, through their callers, the whole batch:
    every body, array and the list of answers that holds the error itself. That reference cycle is
    freed only by Python's rare full collection, so a worker's memory climbed with each refusal
    batched beside large requests (docs/reliability.md#memory-over-hours)."""
    chain: list[Optional[BaseException]] = [error]
    seen: set[int] = set()
    while chain:
        link = chain.pop()
        if link is not None and id(link) not in seen:
            seen.add(id(link))
            link.__traceback__ = None
            chain += [link.__cause__, link.__context__]
    return error


def bad_request(message: str, kind: str = "BadRequest") -> RequestError:
    """A 400 for input that cannot be decoded or has the wrong form."""
    return RequestError(400, kind, message)
