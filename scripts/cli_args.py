"""Command-line values shared by the scripts: image shapes and model kwargs, checked with clear errors."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "handler"))

from image_embedder.errors import ConfigError  # noqa: E402


def parse_shape(text: Optional[str], flag: str = "--input-shape") -> Optional[list[int]]:
    """'3,224,224' -> [3, 224, 224]; None for an empty value."""
    if not text:
        return None
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r} must be integers separated by commas, e.g. 3,224,224") from exc
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"{flag} {text!r} must hold positive integers")
    return shape


def parse_kwargs(text: str, flag: str = "--model-kwargs") -> dict:
    """A JSON object of keyword arguments for the model's class or factory."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value
