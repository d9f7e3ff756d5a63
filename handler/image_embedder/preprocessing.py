"""What an input goes through before the model sees it: presets, a model file's declaration, one line.

Every input is in pixel units, whatever it is: a decoded PNG/JPEG (0..255), a uint8 array, or a
float array (expected 0..255 too when the archive scales). The server applies one formula to all
of them, `(x * scale - mean) / std`, so an image and the same pixels sent as an array always give
the same embedding, and the client's lossless packing of whole-number floats as uint8 changes
nothing. Resize and center crop apply to encoded images only; arrays arrive at their own size.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .settings import EncoderSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# `--preset NAME`: the value settings of the common cases (resize and crop stay as declared).
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    "unit": {"scale": 1 / 255, "mean": None, "std": None},
    "none": {"scale": None, "mean": None, "std": None},
}
# What a model file may declare in a module-level IMAGE_PREPROCESSING dict: the settings of the same names.
DECLARABLE = ("resize", "center_crop", "color_mode", "scale", "mean", "std")
DECLARATION = "IMAGE_PREPROCESSING"


def preset(name: str) -> dict[str, Any]:
    """The settings a preset stands for; an unknown name is refused with the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def declared(module: ModuleType) -> Optional[dict[str, Any]]:
    """The model file's IMAGE_PREPROCESSING, checked for its keys (values are checked as settings), or None."""
    value = getattr(module, DECLARATION, None)
    if value is None:
        return None
    where = f"{DECLARATION} in {getattr(module, '__file__', 'the model file')!r}"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a dict, got {type(value).__name__}")
    unknown = sorted(set(value) - set(DECLARABLE))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(DECLARABLE)}")
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    try:
        EncoderSettings.from_mapping({"model_definition_file": "-", "model_class_name": "-", **out})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return out


def _numbers(values: Any) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def summary(settings: Any) -> str:
    """One line: what an image and an array become before the model, from EncoderSettings."""
    s = settings
    steps = []
    if s.resize:
        steps.append(f"resized to {s.resize} on the shorter side")
    if s.center_crop:
        steps.append(f"center-cropped to {s.center_crop}x{s.center_crop}")
    images = f"PNG/JPEG {', '.join(steps)}; " if steps else ""
    value = "pixels 0..255"
    if s.scale is not None:
        value += f" times {s.scale:.6g} (0..{255 * s.scale:.6g})"
    if s.mean is not None:
        value += f", minus mean {_numbers(s.mean)}"
    if s.std is not None:
        value += f", divided by std {_numbers(s.std)}"
    if s.scale is None and s.mean is None and s.std is None:
        value += ", no normalization"
    return f"{images}images and arrays of any dtype reach the model as {value}; send arrays in pixel units (0..255)"
