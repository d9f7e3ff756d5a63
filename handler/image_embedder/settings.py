"""The encoder's settings: the `handler:` section of an archive's model-config.yaml.

Names and defaults follow Jina's CustomImageTorchEncoder where it had them. Every value is
checked once, at load, so a typo fails the worker start with a message instead of a bad
embedding later.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .errors import ConfigError
from .output_options import OUTPUT_DTYPES, OutputOptions

POOLINGS = ("avg", "max", "none", "cls", "gem")
DTYPES = ("float32", "bfloat16", "float16")
COLOR_MODES = ("auto", "RGB", "L")
# Keys TorchServe itself reads from the same `handler:` section (ts/handler_utils/timer.py's @timed reads
# `profile`): accepted here and left for TorchServe, never refused as typos.
TORCHSERVE_HANDLER_KEYS = ("profile",)


@dataclass(frozen=True)
class EncoderSettings:
    """Validated encoder settings; build with `EncoderSettings.from_mapping`."""

    model_definition_file: str
    model_class_name: str
    model_state_dict_path: Optional[str] = None
    model_init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    layer_name: Union[str, Sequence[str]] = "features"
    pooling: str = "avg"
    gem_p: float = 3.0
    normalize: bool = False
    channel_axis: int = 1
    device: Optional[str] = None
    default_batch_size: Optional[int] = None  # None: 32 on CUDA, 8 on CPU (see pass_size)
    max_images_per_request: int = 1024
    max_batch_pixels: int = 32 * 3 * 512 * 512
    scale: Optional[float] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    early_exit: bool = True
    channels_last: bool = False
    compile: bool = False
    dtype: str = "float32"
    num_threads: Optional[int] = None
    sha256: Optional[str] = None
    resize: Optional[int] = None
    center_crop: Optional[int] = None
    color_mode: str = "auto"
    input_shape: Optional[Sequence[int]] = None
    decode_threads: Optional[int] = None  # threads decoding PNG/JPEG per worker; None: one per core
    jpeg_draft: bool = False  # let libjpeg decode at 1/2..1/8 scale when resize allows (faster, not exact)
    exact_resize: bool = True  # False: resize only the window center_crop keeps (faster, +-1 on a few pixels)
    max_image_pixels: Optional[int] = None  # per encoded image; None: Pillow's MAX_IMAGE_PIXELS
    # where the weights sit in a training checkpoint (None: detected; see checkpoints.py)
    checkpoint_key: Optional[str] = None
    strip_prefix: Optional[str] = None
    checkpoint_detect: bool = True
    keep_weights_dtype: bool = False  # True: run in the weights' dtype instead of casting to the model's
    ignore_keys: Sequence[str] = field(default_factory=list)  # checkpoint weights the model lacks (a training head), dropped by prefix
    reuse_freed_memory: bool = True  # glibc keeps freed request buffers for the next request (allocator.py)
    output_dtype: str = "float32"  # the answer's dtype unless a request asks (output_options.py)
    dimensions: Optional[int] = None  # the answer's first k dimensions unless a request asks; None: all
    calibration_file: Optional[str] = None  # build --calibration: whitening, quantizer statistics (calibration.py)

    def pass_size(self, device_type: str) -> int:
        """The most images in one forward pass: the setting, else 32 on a GPU (CustomImageTorchEncoder's
        default_batch_size) and 8 on a CPU, where bigger passes are slower (activations leave the cache)."""
        if self.default_batch_size is not None:
            return self.default_batch_size
        return 32 if device_type == "cuda" else 8

    @property
    def output(self) -> OutputOptions:
        """The archive's output options, which a request's own choices override."""
        return OutputOptions(self.output_dtype, self.dimensions)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The tapped layers, always as a tuple (one or several)."""
        if isinstance(self.layer_name, str):
            return (self.layer_name,)
        return tuple(self.layer_name)

    @classmethod
    def from_mapping(cls, raw: Optional[Mapping[str, Any]]) -> "EncoderSettings":
        """Check and convert a raw mapping (parsed YAML) into settings."""
        raw = {k: v for k, v in dict(raw or {}).items() if k not in TORCHSERVE_HANDLER_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"unknown handler setting(s) {', '.join(hints)}; valid settings: {', '.join(sorted(known))}"
            )
        for required in ("model_definition_file", "model_class_name"):
            if not raw.get(required):
                raise ConfigError(f"handler setting {required!r} is required and missing")
        settings = cls(**raw)
        settings._validate()
        return settings

    def _validate(self) -> None:
        for name, check in CHECKS.items():  # in the table's order: the first wrong setting is the one reported
            check(name, getattr(self, name))

    def as_dict(self) -> dict[str, Any]:
        """Plain mapping of every setting, for YAML and describe answers."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model_init_kwargs"] = dict(self.model_init_kwargs)
        for key in ("layer_name", "mean", "std", "input_shape", "ignore_keys"):
            if out[key] is not None and not isinstance(out[key], str):
                out[key] = list(out[key])
        return out


Check = Callable[[str, Any], None]  # (setting name, value) -> None, or a ConfigError saying what is wrong


def _anything(name: str, value: Any) -> None:
    """Checked where it is used (a missing model file or class fails the load there)."""


def _one_of(choices: Sequence[str]) -> Check:
    def one_of(name: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")
    return one_of


def _optional(check: Check) -> Check:
    def optional(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)
    return optional


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _positive_number(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _number(name: str, value: Any) -> None:
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")


def _axis(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer (1 or -1), got {value!r}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")


def _mapping(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}")


def _numbers(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value):
        raise ConfigError(f"{name} must be a non-empty list of numbers, got {value!r}")


def _divisors(name: str, value: Any) -> None:
    _numbers(name, value)
    if any(v == 0 for v in value):
        raise ConfigError(f"{name} must not contain 0, got {list(value)!r}")


def _prefixes(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of non-empty key prefixes (e.g. ['head.']), got {value!r}")


def _layer_names(name: str, value: Any) -> None:
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{name} must be a non-empty string or list of strings, got {value!r}")


def _shape(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name} must be a list of positive integers, got {value!r}")
    for dim in value:
        _positive_int(f"{name} entries", dim)


def _sha256(name: str, value: Any) -> None:
    digest = str(value).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{name} must be 64 hex digits, got {value!r}")


# Each setting's kind, checked in this order by EncoderSettings._validate; every field has one
# (test_settings checks).
CHECKS: dict[str, Check] = {
    "model_definition_file": _anything,  # required: from_mapping refuses it missing
    "model_class_name": _anything,  # required, as above
    "model_state_dict_path": _anything,
    "model_init_kwargs": _mapping,
    "layer_name": _layer_names,
    "pooling": _one_of(POOLINGS),
    "dtype": _one_of(DTYPES),
    "color_mode": _one_of(COLOR_MODES),
    "max_images_per_request": _positive_int,
    "max_batch_pixels": _positive_int,
    "default_batch_size": _optional(_positive_int),
    "num_threads": _optional(_positive_int),
    "resize": _optional(_positive_int),
    "center_crop": _optional(_positive_int),
    "decode_threads": _optional(_positive_int),
    "max_image_pixels": _optional(_positive_int),
    "gem_p": _positive_number,
    "channel_axis": _axis,
    "device": _anything,
    "scale": _optional(_number),
    "mean": _optional(_numbers),
    "std": _optional(_divisors),
    "input_shape": _optional(_shape),
    "normalize": _boolean,
    "early_exit": _boolean,
    "channels_last": _boolean,
    "compile": _boolean,
    "jpeg_draft": _boolean,
    "exact_resize": _boolean,
    "checkpoint_key": _optional(_string),  # where the weights sit in a checkpoint
    "strip_prefix": _optional(_string),
    "checkpoint_detect": _boolean,
    "keep_weights_dtype": _boolean,
    "ignore_keys": _prefixes,
    "reuse_freed_memory": _boolean,
    "output_dtype": _one_of(OUTPUT_DTYPES),
    "dimensions": _optional(_positive_int),
    "calibration_file": _optional(_string),
    "sha256": _optional(_sha256),
}
