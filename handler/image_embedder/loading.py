"""Build the user's model from a definition file, a class or factory name and a weights file.

The definition file is code that runs here: only load archives from people you trust. The
weights, however, are never unpickled: torch files go through `weights_only=True`, safetensors
through the safetensors library.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import uuid
from types import ModuleType
from typing import Any, Mapping, Optional

import torch

from .errors import ConfigError


def import_model_file(path: str) -> ModuleType:
    """Import a model definition file under a private module name.

    Its folder goes on sys.path so it can import sibling files shipped beside it; its
    `if __name__ == '__main__':` block does not run.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"model definition file {path!r} does not exist")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"_user_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"model definition file {path!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"importing model definition file {path!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def build_model(module: ModuleType, class_name: str, init_kwargs: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """Call the named class or factory function of `module` with `init_kwargs`."""
    target = getattr(module, class_name, None)
    if target is None or not callable(target):
        candidates = sorted(
            n for n, v in vars(module).items()
            if not n.startswith("_") and (inspect.isfunction(v) or (inspect.isclass(v) and issubclass(v, torch.nn.Module)))
            and getattr(v, "__module__", None) == module.__name__
        )
        raise ConfigError(
            f"model_class_name {class_name!r} is not a class or function in {module.__file__!r}; "
            f"defined there: {', '.join(candidates) or 'nothing usable'}"
        )
    try:
        model = target(**dict(init_kwargs or {}))
    except Exception as exc:
        raise ConfigError(
            f"{class_name}(**{dict(init_kwargs or {})!r}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{class_name}(...) returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str, device: str = "cpu", sha256: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read weights without unpickling objects: .safetensors or a torch file with weights_only."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256.lower():
            raise ConfigError(
                f"weights file {path!r} has sha256 {actual}, expected {sha256.lower()}: the archive was altered"
            )
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ConfigError("weights are .safetensors but the safetensors package is not installed") from exc
        try:
            return load_file(path, device=str(device))
        except Exception as exc:
            raise ConfigError(f"reading safetensors file {path!r} failed: {exc}") from exc
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"weights file {path!r} was refused: it is not a plain state_dict that loads with "
            f"weights_only=True (objects are never unpickled). {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    if not isinstance(state, Mapping):
        raise ConfigError(f"weights file {path!r} holds a {type(state).__name__}, expected a state_dict mapping")
    return dict(state)


def apply_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Strict load that names missing and unexpected keys when they disagree."""
    expected = set(model.state_dict().keys())
    given = set(state.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{source} do not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{source} do not fit the model: {exc}") from exc


def load_model(
    definition_file: str,
    class_name: str,
    state_dict_path: Optional[str],
    init_kwargs: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    sha256: Optional[str] = None,
) -> torch.nn.Module:
    """Import, build, load weights, move to `device` and switch to eval mode."""
    module = import_model_file(definition_file)
    model = build_model(module, class_name, init_kwargs)
    if state_dict_path is not None:
        apply_state_dict(model, load_state_dict(state_dict_path, device, sha256), source=f"weights {state_dict_path!r}")
    return model.to(device).eval()
