"""Pack a user's model file, class/factory name, weights and layer into a self-contained TorchServe .mar.

Before anything is written the model is imported, built, loaded and its layer resolved (and with
--input-shape run once), so a mistake shows here with a clear message, not in a worker log.
Training checkpoints (DataParallel, torch.compile, Lightning, EMA, sharded safetensors) are
unwrapped here, and the archive holds only the clean weights (docs/weights.md).

    python scripts/build_mar.py --model-file model.py --model-class CustomModel \
        --state-dict weights.pth --layer conv1 --input-shape 3,224,224
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import KW_ONLY, dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

import yaml

import image_embedder
from image_embedder.checkpoints import INDEX_SUFFIX, UnwrapOptions
from image_embedder.encoder import ImageEncoder
from image_embedder.errors import ConfigError
from image_embedder.loading import build_model, file_sha256, import_model_file, load_weights
from image_embedder.output_options import OUTPUT_DTYPES
from image_embedder.preprocessing import DECLARABLE, DECLARATION, PRESETS, declared, preset, summary
from image_embedder.settings import POOLINGS, EncoderSettings
from image_embedder_tools.calibrate import calibrate
from image_embedder_tools.cli_args import add_weights_arguments, parse_kwargs, parse_shape, weights_settings
from image_embedder_tools.ts_defaults import DEFAULT_TS_CONFIG

# What an archive carries of this project: handler/ whole, i.e. the TorchServe adapter and the engine
# package beside it. Found by import, so a wheel install (both in site-packages) builds the same archive.
HANDLER_FILE = importlib.util.find_spec("encoder_handler").origin
ENGINE_DIR = os.path.dirname(image_embedder.__file__)
# An archive's version (TorchServe's modelVersion) is a path segment of /predictions/<name>/<version>
# and /models/<name>/<version>; TorchServe takes any string, this build only numbers joined by dots.
VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class ArchiveSpec:
    """One build: the user's files, the layer, handler settings and where the archive goes.

    The first four are positional; everything else is named. `settings` holds any other handler
    setting (`--set`), including where the weights sit in a checkpoint (checkpoint_key, strip_prefix).
    """

    model_file: str
    model_class: str
    state_dict: Optional[str]
    layer: str
    _: KW_ONLY
    pooling: str = "avg"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    extra_files: Sequence[str] = ()
    batch_size: Optional[int] = None
    input_shape: Optional[Sequence[int]] = None
    config_file: Optional[str] = None
    name: str = "encoder"
    version: str = "1.0"
    export_path: str = "model_store"
    settings: Mapping[str, Any] = field(default_factory=dict)
    preset: Optional[str] = None  # imagenet | unit | none: scale/mean/std below the explicit settings
    requirements_file: Optional[str] = None
    calibration: Optional[str] = None  # the user's images: whitening and the quantized dtypes (calibrate.py)
    whiten: Optional[int] = None  # PCA-whiten to this many dimensions, fitted on `calibration`
    whiten_power: float = 1.0  # eigenvalue^(-power/2): 1 full whitening, 0 the PCA rotation alone


# Settings that say where the weights sit in the user's file: used at build time, then dropped,
# because the archive holds the weights already taken out and stripped.
UNWRAP_SETTINGS = ("checkpoint_key", "strip_prefix", "checkpoint_detect", "ignore_keys")


def handler_settings(spec: ArchiveSpec) -> dict[str, Any]:
    """The `handler:` section, with paths as they will lie in the archive root (weights added later)."""
    layers = [name.strip() for name in spec.layer.split(",") if name.strip()]
    settings: dict[str, Any] = {
        "model_definition_file": os.path.basename(spec.model_file),
        "model_class_name": spec.model_class,
        "layer_name": layers[0] if len(layers) == 1 else layers,
        "pooling": spec.pooling,
        "model_init_kwargs": dict(spec.model_kwargs or {}),
    }
    if spec.batch_size is not None:
        settings["default_batch_size"] = spec.batch_size
    if spec.input_shape:
        settings["input_shape"] = list(spec.input_shape)
    settings.update(spec.settings or {})
    return settings


def merged_model_config(user_config: Optional[str], handler: dict[str, Any]) -> dict[str, Any]:
    """Our TorchServe defaults under the user's model-config.yaml (the keys it sets win), with our
    `handler:` section merged into its own."""
    config: dict[str, Any] = dict(DEFAULT_TS_CONFIG)
    if user_config:
        with open(user_config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config-file {user_config!r} must hold a YAML mapping")
        config.update(loaded)
        delay, batch = config.get("maxBatchDelay"), config.get("batchSize")
        if isinstance(delay, int) and delay <= 0 and isinstance(batch, int) and batch > 1:
            # ModelManager reads maxBatchDelay <= 0 from model-config.yaml as unset: its default, 100 ms
            raise ConfigError(f"--config-file {user_config!r} sets maxBatchDelay {delay}: TorchServe 0.12 reads "
                              "0 or less as unset and holds every batch for its default 100 ms; set 1 or more "
                              "(ms a lone request waits for company), or batchSize 1 for no batching")
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


@contextlib.contextmanager
def _named_as_given(root: str, files: Sequence[str]) -> Iterator[None]:
    """Errors raised over the staged copies name the user's files, never the temporary folder."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        for path in files:
            message = message.replace(os.path.join(root, os.path.basename(path)), path)
        raise ConfigError(message.replace(root + os.sep, "")) from exc


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _source_size(path: str) -> int:
    """Bytes of the user's weights: the file, or an index and all its shards."""
    if not path.endswith(INDEX_SUFFIX):
        return os.path.getsize(path)
    with open(path) as f:
        shards = set(json.load(f)["weight_map"].values())
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), s)) for s in shards)


def _clean_name(path: str) -> str:
    """`run3/last.ckpt` -> `last.pth`; a (sharded) safetensors source stays safetensors."""
    base = os.path.basename(path)
    for suffix in (INDEX_SUFFIX, ".safetensors", ".ckpt", ".pth.tar", ".pth", ".pt", ".bin", ".tar"):
        if base.endswith(suffix):
            stem = base[: -len(suffix)]
            return stem + (".safetensors" if "safetensors" in suffix else ".pth")
    return base + ".pth"


def prepare_weights(spec: ArchiveSpec, settings: EncoderSettings, model: torch.nn.Module, root: str,
                    say: Callable[..., None]) -> str:
    """Find the weights in the user's file, load them into `model` (built from the staged definition
    file), and write them clean into `root`.

    Returns the path of the file the archive holds: the user's own file when it already is the
    plain state_dict, else the weights alone (no optimizer state, no container, no prefix, in
    their own dtype, as a torch file or safetensors as the source was).
    """
    source = spec.state_dict
    assert source is not None
    report = load_weights(model, source, UnwrapOptions.from_settings(settings))
    for line in report.lines():
        say(f"weights: {line}")
    if report.found.is_plain and not source.endswith(INDEX_SUFFIX):
        shutil.copy2(source, root)
        return source
    target = os.path.join(root, _clean_name(source))
    if os.path.exists(target):
        raise ConfigError(f"the clean weights of {source!r} would be named {os.path.basename(target)!r} in the "
                          f"archive, like one of your other files: rename one of them")
    clean = {k: v.detach().contiguous().clone() for k, v in report.found.state.items()}  # own storage each
    if target.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(clean, target, metadata={"format": "pt"})
    else:
        torch.save(clean, target)
    before, after = _source_size(source), os.path.getsize(target)
    say(f"weights: the archive holds the weights alone as {os.path.basename(target)}, {_size(after)}; "
        f"{os.path.basename(source)} was {_size(before)}: {100 * (before - after) / before:.0f}% smaller")
    return target


def build_archive(spec: ArchiveSpec, quiet: bool = False) -> str:
    """Check the model, then write `<export_path>/<name>.mar`; returns its path."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if not VERSION.fullmatch(spec.version):
        raise ConfigError(f"--version {spec.version!r} is not a version: expected numbers joined by dots, "
                          f"e.g. 1.0, 2.0 or 2.0.1 (it is part of the URL /predictions/{spec.name}/<version>)")
    given = [spec.model_file, *([spec.state_dict] if spec.state_dict else []), *spec.extra_files]
    for path in [*given, *(p for p in (spec.config_file, spec.requirements_file, spec.calibration) if p)]:
        if not os.path.exists(path):
            raise ConfigError(f"{path!r} does not exist")
    if spec.whiten is not None and not spec.calibration:
        raise ConfigError(f"--whiten {spec.whiten} is fitted on your images: give them with --calibration DIR|FILE.npy")
    if spec.preset is not None:
        preset(spec.preset)  # an unknown name fails here, before anything is staged
    config = merged_model_config(spec.config_file, handler_settings(spec))
    if not spec.state_dict:
        say(f"warning: no --state-dict: the archive holds {spec.model_class}'s freshly initialized (untrained) "
            f"weights, unless the model loads its own; its embeddings will mean nothing otherwise")
    with tempfile.TemporaryDirectory(prefix="mar-build-") as root:  # the archive's root as a worker will see it
        _stage([spec.model_file, *spec.extra_files], root)
        with _named_as_given(root, given), _forgotten_sibling(spec):
            config["handler"] = _check_model(spec, config["handler"], root, say)
        shutil.copy(HANDLER_FILE, root)
        shutil.copytree(ENGINE_DIR, os.path.join(root, os.path.basename(ENGINE_DIR)),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        path = _write_archive(spec, config, root)
    if spec.requirements_file:
        say(f"requirements: {os.path.basename(spec.requirements_file)} is in the archive; TorchServe pip-installs it "
            f"at every model load only with install_py_dep_per_model=true in its config.properties")
    say(f"wrote {path}")
    return path


@contextlib.contextmanager
def _forgotten_sibling(spec: ArchiveSpec) -> Iterator[None]:
    """A module the model file can't import that lies beside the user's model file is a file left out of
    --extra-files, not a package to install: say that instead."""
    try:
        yield
    except ConfigError as exc:
        missing = exc.__cause__
        top = (missing.name or "").split(".")[0] if isinstance(missing, ModuleNotFoundError) else ""
        sibling = os.path.join(os.path.dirname(os.path.abspath(spec.model_file)), top + ".py")
        if top and os.path.isfile(sibling):
            raise ConfigError(f"{spec.model_file!r} imports {top!r}, and {sibling!r} lies beside it but is not "
                              f"in the archive: pass it with --extra-files {sibling}") from exc
        raise


def _check_model(spec: ArchiveSpec, handler: dict[str, Any], root: str, say: Callable[..., None]) -> dict[str, Any]:
    """Build the model once from the staged `root`, with the user's weights cleaned into it, resolve its
    layers and (with an input shape) run it once; returns the archive's `handler:` section."""
    module = import_model_file(os.path.join(root, os.path.basename(spec.model_file)))  # the only import
    handler, source = with_preprocessing(spec, handler, module)
    settings = EncoderSettings.from_mapping(handler)
    say(f"preprocessing ({source}): {summary(settings)}")
    model = build_model(module, spec.model_class, spec.model_kwargs)
    weights = prepare_weights(spec, settings, model, root, say) if spec.state_dict else None
    handler = {k: v for k, v in handler.items() if k not in UNWRAP_SETTINGS}
    if weights:
        handler.update(model_state_dict_path=os.path.basename(weights), sha256=file_sha256(weights))
    if spec.calibration:  # measured without the output options, which may need what it learns
        encoder = ImageEncoder(EncoderSettings.from_mapping({**handler, "output_dtype": "float32", "dimensions": None}),
                               root, model=model)
        handler["calibration_file"] = calibrate(encoder, spec.calibration, spec.whiten, root, say, spec.whiten_power)
        encoder.tap.remove()
    encoder = ImageEncoder(EncoderSettings.from_mapping(handler), root, model=model)
    say(f"model {spec.model_class} from {spec.model_file}: layer(s) {handler['layer_name']} resolved"
        + (", weights loaded" if weights else ""))
    if encoder.embedding_dim is not None:
        say(f"one forward pass on {list(spec.input_shape or settings.input_shape or [])}: "
            f"embedding size {encoder.embedding_dim}")
    return handler


def with_preprocessing(spec: ArchiveSpec, handler: dict[str, Any], module: ModuleType) -> tuple[dict[str, Any], str]:
    """`handler` over the preset over the model file's IMAGE_PREPROCESSING (explicit settings win), and
    where the preprocessing came from, or how to declare it when nothing did."""
    from_file = declared(module) or {}
    from_preset = preset(spec.preset) if spec.preset else {}
    explicit = sorted(k for k in DECLARABLE if k in handler)
    merged = {**from_file, **from_preset, **handler}
    sources = ([f"{DECLARATION} in {os.path.basename(spec.model_file)}"] if from_file else []) + (
        [f"--preset {spec.preset}"] if spec.preset else []) + ([f"settings {', '.join(explicit)}"] if explicit else [])
    source = ("from " + ", ".join(sources) if sources else
              f"nothing declared: declare {DECLARATION} in the model file or pass --preset {'|'.join(PRESETS)}")
    return {k: v for k, v in merged.items() if not (k in DECLARABLE and v is None)}, source


def _write_archive(spec: ArchiveSpec, config: dict[str, Any], root: str) -> str:
    """Zip `root` with `config` as model-config.yaml and the manifest into `<export_path>/<name>.mar`.

    torch-model-archiver's own entry point would copy everything again into <gettempdir()>/<name> and
    delete that folder afterwards (two builds of one name at once would delete each other's files), so
    only its manifest writer and zipper are used, over the folder already staged here.
    """
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging_utils import ModelExportUtils

    config_path = os.path.join(root, "model-config.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    if spec.requirements_file:  # the archive root, named in the manifest: where TorchServe reads it
        shutil.copy(spec.requirements_file, root)
    archiver = ModelArchiverConfig(model_name=spec.name, handler=HANDLER_FILE, version=spec.version,
                                   export_path=spec.export_path, force=True, config_file=config_path,
                                   requirements_file=spec.requirements_file)
    os.makedirs(spec.export_path, exist_ok=True)
    ModelExportUtils.archive(spec.export_path, spec.name, root, ModelExportUtils.generate_manifest_json(archiver))
    return ModelExportUtils.get_archive_export_path(spec.export_path, spec.name, "default")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-file", required=True, help="the .py file that defines the model")
    parser.add_argument("--model-class", required=True, help="class or factory function in that file")
    parser.add_argument("--state-dict", help="weights: a torch state_dict or training checkpoint, .safetensors, "
                        "or a sharded model.safetensors.index.json (docs/weights.md)")
    parser.add_argument("--layer", required=True, help="dotted submodule name; several joined by commas")
    parser.add_argument("--pooling", default="avg", choices=POOLINGS)
    parser.add_argument("--model-kwargs", default="{}", help="JSON object passed to the class or factory")
    parser.add_argument("--extra-files", default="", help="comma-separated files the model file imports")
    parser.add_argument("--batch-size", type=int, help="default_batch_size: most images in one forward pass")
    parser.add_argument("--input-shape", help="C,H,W: run one forward pass now and print the embedding size")
    parser.add_argument("--config-file", help="a model-config.yaml with TorchServe keys to merge into")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="preprocessing: imagenet (scale 1/255, ImageNet mean/std), unit (scale 1/255) or none; "
                             "over the model file's IMAGE_PREPROCESSING, under --set")
    parser.add_argument("--requirements-file", help="the model's pip requirements, carried in the archive "
                        "(TorchServe installs them at model load with install_py_dep_per_model=true)")
    parser.add_argument("--output-dtype", choices=OUTPUT_DTYPES,
                        help="the answers' dtype unless a request asks for another (default float32; docs/api.md#output-options)")
    parser.add_argument("--dimensions", type=int, help="answer the first K dimensions unless a request asks for "
                        "another K (renormalized when normalize is on); default: all")
    parser.add_argument("--calibration", metavar="DIR|FILE.npy", help="your own images (PNG/JPEG/.npy): the "
                        "statistics of the int8, uint8 and binary dtypes and the fit of --whiten")
    parser.add_argument("--whiten", type=int, metavar="K", help="PCA-whiten the embeddings to K dimensions, "
                        "fitted on --calibration (applied before normalize)")
    parser.add_argument("--whiten-power", type=float, default=1.0, metavar="P", help="scale each whitened "
                        "component by eigenvalue^(-P/2): 1 full whitening (default), 0 the PCA rotation alone")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other handler setting, VALUE read as YAML (e.g. --set normalize=true)")
    add_weights_arguments(parser)
    parser.add_argument("--name", default="encoder", help="model name: the archive is <name>.mar")
    parser.add_argument("--version", default="1.0", help="the archive's version (e.g. 2.0): served beside others "
                        "of the same name as /predictions/<name>/<version> (docs/usage.md#versions-and-rollout)")
    parser.add_argument("--export-path", default="model_store")
    args = parser.parse_args(argv)
    try:
        kwargs = parse_kwargs(args.model_kwargs)
        extra: dict[str, Any] = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r} must look like KEY=VALUE")
            extra[key.strip()] = yaml.safe_load(value)
        output = {key: value for key, value in (("output_dtype", args.output_dtype), ("dimensions", args.dimensions))
                  if value is not None}
        build_archive(ArchiveSpec(
            args.model_file, args.model_class, args.state_dict, args.layer, pooling=args.pooling,
            model_kwargs=kwargs, extra_files=[p for p in args.extra_files.split(",") if p],
            batch_size=args.batch_size, input_shape=parse_shape(args.input_shape), config_file=args.config_file,
            name=args.name, version=args.version, export_path=args.export_path,
            settings={**weights_settings(args), **output, **extra}, preset=args.preset,
            requirements_file=args.requirements_file, calibration=args.calibration, whiten=args.whiten,
            whiten_power=args.whiten_power,
        ))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
