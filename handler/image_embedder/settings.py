"""The encoder's settings: the `handler:` section of an archive's model-config.yaml.

Names and defaults follow Jina's CustomImageTorchEncoder where it had them. Every value is
checked once, at load, so a typo fails the worker start with a message instead of a bad
embedding later.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import ConfigError

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

    def pass_size(self, device_type: str) -> int:
        """The most images in one forward pass: the setting, else the original's 32 on a GPU and
        8 on a CPU, where bigger passes were measured slower (activations leave the cache)."""
        if self.default_batch_size is not None:
            return self.default_batch_size
        return 32 if device_type == "cuda" else 8

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
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.color_mode not in COLOR_MODES:
            raise ConfigError(f"color_mode {self.color_mode!r} is not one of {', '.join(COLOR_MODES)}")
        if not isinstance(self.model_init_kwargs, Mapping):
            raise ConfigError(
                f"model_init_kwargs must be a mapping, got {type(self.model_init_kwargs).__name__}"
            )
        names = self.layer_names if isinstance(self.layer_name, (str, list, tuple)) else ()
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"layer_name must be a non-empty string or list of strings, got {self.layer_name!r}")
        for name in ("max_images_per_request", "max_batch_pixels"):
            _positive_int(name, getattr(self, name))
        for name in ("default_batch_size", "num_threads", "resize", "center_crop", "decode_threads", "max_image_pixels"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.gem_p, bool) or not isinstance(self.gem_p, (int, float)) or self.gem_p <= 0:
            raise ConfigError(f"gem_p must be a positive number, got {self.gem_p!r}")
        if isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int):
            raise ConfigError(f"channel_axis must be an integer (1 or -1), got {self.channel_axis!r}")
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))):
            raise ConfigError(f"scale must be a number, got {self.scale!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
                ):
                    raise ConfigError(f"{name} must be a non-empty list of numbers, got {value!r}")
        if self.std is not None and any(v == 0 for v in self.std):
            raise ConfigError(f"std must not contain 0, got {list(self.std)!r}")
        if self.input_shape is not None:
            if not isinstance(self.input_shape, (list, tuple)) or not self.input_shape:
                raise ConfigError(f"input_shape must be a list of positive integers, got {self.input_shape!r}")
            for dim in self.input_shape:
                _positive_int("input_shape entries", dim)
        for name in ("normalize", "early_exit", "channels_last", "compile", "jpeg_draft", "exact_resize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("checkpoint_key", "strip_prefix"):  # where the weights sit in a checkpoint
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("checkpoint_detect", "keep_weights_dtype"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.sha256 is not None:
            digest = str(self.sha256).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"sha256 must be 64 hex digits, got {self.sha256!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain mapping of every setting, for YAML and describe answers."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model_init_kwargs"] = dict(self.model_init_kwargs)
        for key in ("layer_name", "mean", "std", "input_shape"):
            if out[key] is not None and not isinstance(out[key], str):
                out[key] = list(out[key])
        return out


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
