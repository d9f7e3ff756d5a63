"""Command-line values shared by the scripts: image shapes and model kwargs, checked with clear errors."""
from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from image_embedder.checkpoints import UnwrapOptions
from image_embedder.errors import ConfigError


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


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the weights sit inside a training checkpoint (docs/weights.md); all optional."""
    group = parser.add_argument_group("weights inside a checkpoint (default: detected when unambiguous)")
    group.add_argument("--checkpoint-key", metavar="KEY",
                       help="the entry holding the weights, e.g. state_dict_ema (nested: model/state_dict; '' = top level)")
    group.add_argument("--strip-prefix", metavar="PREFIX",
                       help="strip this from every key, e.g. module. or model. ('' = strip nothing)")
    group.add_argument("--no-detect", action="store_true",
                       help="no detection: the top level and no prefix unless given above")
    group.add_argument("--ignore-keys", action="append", default=[], metavar="PREFIX",
                       help="drop the checkpoint's weights whose names (as the model names them) start with PREFIX, "
                            "e.g. head. for a training head the embedding model lacks; repeatable")
    group.add_argument("--keep-dtype", action="store_true",
                       help="run the model in the weights' dtype (float16/bfloat16) instead of casting them to float32")


def weights_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The handler settings the weights flags stand for (only those given)."""
    settings: dict[str, Any] = {}
    if args.checkpoint_key is not None:
        settings["checkpoint_key"] = args.checkpoint_key
    if args.strip_prefix is not None:
        settings["strip_prefix"] = args.strip_prefix
    if args.no_detect:
        settings["checkpoint_detect"] = False
    if args.keep_dtype:
        settings["keep_weights_dtype"] = True
    if args.ignore_keys:
        settings["ignore_keys"] = list(args.ignore_keys)
    return settings


def unwrap_options(args: argparse.Namespace) -> UnwrapOptions:
    """The weights flags as options for loading.load_model."""
    return UnwrapOptions(args.checkpoint_key, args.strip_prefix, not args.no_detect, args.keep_dtype,
                         tuple(args.ignore_keys))
