"""Build the user's model from a definition file, a class or factory name and a weights file.

The definition file is code that runs here: only load archives from people you trust. The
weights, however, are never unpickled: torch files go through `weights_only=True`, safetensors
through the safetensors library; checkpoints.py finds the state_dict inside training checkpoints.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import uuid
from types import ModuleType
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .checkpoints import (UnwrapOptions, Unwrapped, dtype_changes, keep_weights_dtype, read_weights, unwrap,
                          weights_dtype)
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
    except ModuleNotFoundError as exc:
        del sys.modules[name]
        raise ConfigError(missing_module_message(path, exc)) from exc
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"importing model definition file {path!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def missing_module_message(path: str, exc: ModuleNotFoundError) -> str:
    """What to do when the model file needs a module this Python can't find: the same words at build
    time and in a worker's log, since the fix may be due in either place (or both).

    A package must be importable where the archive is built (the build runs the model) and where it
    is served: TorchServe installs an archive's requirements file at each model load only with
    `install_py_dep_per_model=true`; otherwise the server's image or venv must hold it. A name that
    is the user's own file is fixed by shipping that file, not by pip."""
    missing = exc.name or str(exc)
    top = missing.split(".")[0]
    return (
        f"importing model definition file {path!r} needs module {missing!r}, which cannot be found here "
        f"({type(exc).__name__}: {exc}). If it comes from a package, install that package where you build "
        f"(e.g. `pip install {top}`; the pip name may differ from the module's), and give the server it: "
        f"build with --requirements-file naming it and set install_py_dep_per_model=true in TorchServe's "
        f"config.properties, or install it into the server's image or venv "
        f"(docs/usage.md#models-with-dependencies). If {top!r} is a file of yours ({top}.py beside the model "
        f"file), ship it with --extra-files."
    )


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


def load_state_dict(path: str, device: str = "cpu", sha256: Optional[str] = None,
                    shown_as: Optional[str] = None) -> dict[str, Any]:
    """Read weights without unpickling objects (see checkpoints.read_weights), after the sha256 check.

    The result may be a checkpoint container; `unwrap` finds the model's state_dict in it.
    """
    name = shown_as or path
    if sha256 is not None and os.path.isfile(path):
        actual = file_sha256(path)
        if actual != sha256.lower():
            raise ConfigError(
                f"weights file {name!r} has sha256 {actual}, expected {sha256.lower()}: the archive was altered"
            )
    return dict(read_weights(path, device, shown_as=name))


def apply_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Strict load of weights whose keys the unwrapping already matched to the model's (checkpoints.py);
    a shape that disagrees is a ConfigError with torch's message."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{source} do not fit the model: {exc}") from exc


@dataclass
class WeightsReport:
    """What load_weights did: the reading taken, dtype casts, or the dtype the model was given."""

    found: Unwrapped
    casts: dict[tuple[str, str], int]
    kept_dtype: Optional[torch.dtype] = None

    def lines(self) -> list[str]:
        out = [self.found.summary()]
        for (src, dst), count in sorted(self.casts.items()):
            out.append(f"cast {count} {src} tensors to {dst} (the model's dtype); keep_weights_dtype keeps {src}")
        if self.kept_dtype is not None:
            out.append(f"model converted to {str(self.kept_dtype).replace('torch.', '')}, the weights' dtype")
        return out


def load_weights(model: torch.nn.Module, path: str, options: UnwrapOptions = UnwrapOptions(), device: str = "cpu",
                 sha256: Optional[str] = None, shown_as: Optional[str] = None) -> WeightsReport:
    """Find the model's weights in the file at `path` and load them strictly; says what it did.

    `shown_as` is the name errors and the report give the file (the user's path, not a staged copy).
    """
    name = shown_as or path
    source = f"weights {name!r}"
    found = unwrap(load_state_dict(path, device, sha256, shown_as=name), list(model.state_dict()), options, source)
    casts = dtype_changes(model, found.state)
    kept = None
    if options.keep_dtype:
        kept = weights_dtype(found.state, source)
        if kept is not None:
            keep_weights_dtype(model, kept)
            casts = {}
    apply_state_dict(model, found.state, source)
    return WeightsReport(found, casts, kept)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its definition file, the class or factory there and its kwargs, and
    optionally its weights (their sha256, and how to find them inside a training checkpoint)."""

    definition_file: str
    class_name: str
    state_dict_path: Optional[str] = None
    init_kwargs: Optional[Mapping[str, Any]] = None
    sha256: Optional[str] = None
    unwrap: UnwrapOptions = UnwrapOptions()

    @classmethod
    def from_settings(cls, settings: Any, model_dir: str = ".") -> "ModelSource":
        """The model an archive's EncoderSettings name, its files found in `model_dir`."""
        weights = settings.model_state_dict_path
        return cls(
            definition_file=os.path.join(model_dir, settings.model_definition_file),
            class_name=settings.model_class_name,
            state_dict_path=os.path.join(model_dir, weights) if weights else None,
            init_kwargs=settings.model_init_kwargs,
            sha256=settings.sha256,
            unwrap=UnwrapOptions.from_settings(settings),
        )

    def load(self, device: str = "cpu") -> torch.nn.Module:
        """Import, build, load weights (finding them inside a checkpoint), move to `device`, eval mode."""
        module = import_model_file(self.definition_file)
        model = build_model(module, self.class_name, self.init_kwargs)
        if self.state_dict_path is not None:
            load_weights(model, self.state_dict_path, self.unwrap, device, self.sha256)
        return model.to(device).eval()


def load_model(
    definition_file: str,
    class_name: str,
    state_dict_path: Optional[str],
    init_kwargs: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    sha256: Optional[str] = None,
    *,
    unwrap_options: UnwrapOptions = UnwrapOptions(),
) -> torch.nn.Module:
    """ModelSource(...).load(device), for callers that hold the paths rather than settings."""
    return ModelSource(definition_file, class_name, state_dict_path, init_kwargs, sha256, unwrap_options).load(device)
