#!/usr/bin/env python3
"""Pack a user's model file, class/factory name, weights and layer into a self-contained TorchServe .mar.

Before anything is written the model is imported, built, loaded and its layer resolved (and with
--input-shape run once), so a mistake shows here with a clear message, not in a worker log.

    python scripts/build_mar.py --model-file model.py --model-class CustomModel \
        --state-dict weights.pth --layer conv1 --input-shape 3,224,224
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANDLER_DIR = os.path.join(REPO, "handler")
sys.path.insert(0, HANDLER_DIR)

from cli_args import parse_kwargs, parse_shape  # noqa: E402
from image_embedder.encoder import ImageEncoder  # noqa: E402
from image_embedder.errors import ConfigError  # noqa: E402
from image_embedder.loading import file_sha256  # noqa: E402
from image_embedder.settings import POOLINGS, EncoderSettings  # noqa: E402

PACKAGE = "image_embedder"
HANDLER_FILE = os.path.join(HANDLER_DIR, "encoder_handler.py")
# TorchServe keys written when the user brings no model-config.yaml: one worker that owns the
# cores, and dynamic batching that waits at most 20 ms to fill a batch of 16 requests (what
# scripts/bench.py found best for 16 concurrent single-image clients on a 2-core CPU).
DEFAULT_TS_CONFIG: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 16,
    "maxBatchDelay": 20,
    "responseTimeout": 120,
}


def handler_settings(
    model_file: str,
    model_class: str,
    state_dict: Optional[str],
    layer: str,
    pooling: str = "avg",
    model_kwargs: Optional[dict] = None,
    batch_size: Optional[int] = None,
    input_shape: Optional[Sequence[int]] = None,
    extra: Optional[dict] = None,
) -> dict[str, Any]:
    """The `handler:` section, with paths as they will lie in the archive root."""
    layers = [name.strip() for name in layer.split(",") if name.strip()]
    settings: dict[str, Any] = {
        "model_definition_file": os.path.basename(model_file),
        "model_class_name": model_class,
        "layer_name": layers[0] if len(layers) == 1 else layers,
        "pooling": pooling,
        "model_init_kwargs": dict(model_kwargs or {}),
    }
    if state_dict:
        settings["model_state_dict_path"] = os.path.basename(state_dict)
        settings["sha256"] = file_sha256(state_dict)
    if batch_size is not None:
        settings["default_batch_size"] = batch_size
    if input_shape:
        settings["input_shape"] = list(input_shape)
    settings.update(extra or {})
    return settings


def merged_model_config(user_config: Optional[str], handler: dict[str, Any]) -> dict[str, Any]:
    """The user's model-config.yaml (TorchServe keys kept) with our `handler:` section merged in."""
    config: dict[str, Any] = dict(DEFAULT_TS_CONFIG)
    if user_config:
        with open(user_config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config-file {user_config!r} must hold a YAML mapping")
        config = loaded
    config["handler"] = {**(config.get("handler") or {}), **handler}
    return config


def _stage(files: Sequence[str], folder: str) -> None:
    """Copy files flat into `folder`, as torch-model-archiver lays --extra-files in the archive root."""
    for path in files:
        if os.path.isdir(path):
            for item in os.listdir(path):
                src = os.path.join(path, item)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(folder, item))
        else:
            shutil.copy2(path, folder)


def validate(config: dict[str, Any], files: Sequence[str]) -> ImageEncoder:
    """Load the model exactly as a worker will, from a copy of the archive's root."""
    settings = EncoderSettings.from_mapping(config["handler"])
    with tempfile.TemporaryDirectory(prefix="mar-check-") as root:
        _stage(files, root)
        return ImageEncoder(settings, root)


def build_archive(
    model_file: str,
    model_class: str,
    state_dict: Optional[str],
    layer: str,
    pooling: str = "avg",
    model_kwargs: Optional[dict] = None,
    extra_files: Sequence[str] = (),
    batch_size: Optional[int] = None,
    input_shape: Optional[Sequence[int]] = None,
    config_file: Optional[str] = None,
    name: str = "encoder",
    export_path: str = "model_store",
    settings: Optional[dict] = None,
    quiet: bool = False,
) -> str:
    """Check the model, then write `<export_path>/<name>.mar`; returns its path."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    for path in [model_file, *( [state_dict] if state_dict else []), *extra_files, *([config_file] if config_file else [])]:
        if not os.path.exists(path):
            raise ConfigError(f"{path!r} does not exist")
    handler = handler_settings(model_file, model_class, state_dict, layer, pooling, model_kwargs,
                               batch_size, input_shape, settings)
    config = merged_model_config(config_file, handler)
    user_files = [model_file, *([state_dict] if state_dict else []), *extra_files]
    encoder = validate(config, user_files)
    say(f"model {model_class} from {model_file}: layer(s) {handler['layer_name']} resolved, weights loaded")
    if encoder.embedding_dim is not None:
        say(f"one forward pass on {list(input_shape or [])}: embedding size {encoder.embedding_dim}")

    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    os.makedirs(export_path, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mar-build-") as work:
        package_root = os.path.join(work, "package")
        shutil.copytree(os.path.join(HANDLER_DIR, PACKAGE), os.path.join(package_root, PACKAGE),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        config_path = os.path.join(work, "model-config.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        # The archiver stages files in <gettempdir()>/<name> and deletes it afterwards: two builds of
        # the same name at once (parallel test runs, serve.sh) would delete each other's files.
        shared_tmp, tempfile.tempdir = tempfile.tempdir, work
        try:
            generate_model_archive(ModelArchiverConfig(
                model_name=name,
                handler=HANDLER_FILE,
                version="1.0",
                extra_files=",".join([*user_files, package_root]),
                export_path=export_path,
                force=True,
                config_file=config_path,
            ))
        finally:
            tempfile.tempdir = shared_tmp
    path = os.path.join(export_path, f"{name}.mar")
    say(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-file", required=True, help="the .py file that defines the model")
    parser.add_argument("--model-class", required=True, help="class or factory function in that file")
    parser.add_argument("--state-dict", help="weights: a torch state_dict file or .safetensors")
    parser.add_argument("--layer", required=True, help="dotted submodule name; several joined by commas")
    parser.add_argument("--pooling", default="avg", choices=POOLINGS)
    parser.add_argument("--model-kwargs", default="{}", help="JSON object passed to the class or factory")
    parser.add_argument("--extra-files", default="", help="comma-separated files the model file imports")
    parser.add_argument("--batch-size", type=int, help="default_batch_size: most images in one forward pass")
    parser.add_argument("--input-shape", help="C,H,W: run one forward pass now and print the embedding size")
    parser.add_argument("--config-file", help="a model-config.yaml with TorchServe keys to merge into")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other handler setting, VALUE read as YAML (e.g. --set normalize=true)")
    parser.add_argument("--name", default="encoder", help="model name: the archive is <name>.mar")
    parser.add_argument("--export-path", default=os.path.join(REPO, "model_store"))
    args = parser.parse_args(argv)
    try:
        kwargs = parse_kwargs(args.model_kwargs)
        extra: dict[str, Any] = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r} must look like KEY=VALUE")
            extra[key.strip()] = yaml.safe_load(value)
        build_archive(
            args.model_file, args.model_class, args.state_dict, args.layer, args.pooling, kwargs,
            [p for p in args.extra_files.split(",") if p], args.batch_size, parse_shape(args.input_shape),
            args.config_file, args.name, args.export_path, extra,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
