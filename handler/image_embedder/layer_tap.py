"""Capture the output of named submodules during a forward pass, and stop it once they have fired.

Early exit: nothing after the tapped layers can change the embedding, so the hook raises a
private signal once every tapped layer has produced its output and the rest of the forward
pass never runs. Without early exit the captured tensor is cloned, since a later in-place
operation (a `ReLU(inplace=True)`) could otherwise change it.
"""
from __future__ import annotations

import difflib
from typing import Callable, Optional, Sequence

import torch

from .errors import ConfigError


class _TapsFilled(BaseException):
    """Raised inside the forward pass once every tapped layer has fired. A BaseException, so a
    model's own `except Exception:` around a submodule can't swallow it and run on."""


def resolve_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule at dotted path `name`, or a ConfigError naming the closest valid ones."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
    shown = close or valid[:15]
    raise ConfigError(
        f"layer_name {name!r} is not a submodule of {type(model).__name__}; "
        f"{'closest' if close else 'some'} valid names: {', '.join(shown)}"
        + ("" if close or len(valid) <= 15 else f" ... ({len(valid)} in all)")
    )


def first_tensor(output: object) -> Optional[torch.Tensor]:
    """A module's output tensor: the output itself, or the first item of a tuple/list; else None."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class LayerTap:
    """Forward hooks on the named layers of `model`, registered once and reused for every call."""

    def __init__(self, model: torch.nn.Module, layer_names: Sequence[str], early_exit: bool = True) -> None:
        self.model = model
        self.layer_names = tuple(layer_names)
        self.early_exit = early_exit
        self._captured: dict[str, torch.Tensor] = {}
        self._active = False  # hooks capture (and stop the pass) only inside __call__
        self._handles = [
            resolve_layer(model, name).register_forward_hook(self._hook_for(name)) for name in self.layer_names
        ]

    def _hook_for(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            if not self._active or name in self._captured:  # a module called twice: its first output counts
                return
            tensor = first_tensor(output)
            if tensor is None:
                raise TypeError(f"tapped layer {name!r} returned {type(output).__name__}, expected a tensor")
            last = len(self._captured) + 1 == len(self.layer_names)
            # Only the output that ends an early-exited pass is safe from later in-place ops.
            self._captured[name] = tensor if (self.early_exit and last) else tensor.clone()
            if self.early_exit and last:
                raise _TapsFilled

        return hook

    def __call__(self, batch: torch.Tensor, forward: Callable[[torch.Tensor], object] | None = None) -> list[torch.Tensor]:
        """Run `forward` (default: the model) on `batch`; the tapped outputs, in layer order."""
        self._captured = {}
        self._active = True
        try:
            # `is None`, not `or`: a compiled module's truth value calls len(), which it refuses.
            (self.model if forward is None else forward)(batch)
        except _TapsFilled:
            pass
        finally:
            self._active = False
        captured, self._captured = self._captured, {}
        missing = [n for n in self.layer_names if n not in captured]
        if missing:
            raise RuntimeError(f"layer(s) {missing} did not run during the forward pass")
        return [captured[n] for n in self.layer_names]

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
