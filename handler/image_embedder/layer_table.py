"""Which layer to tap: one forward pass with a hook on every submodule, and what each would give.

Hooks see whatever the model really runs, so models torch.fx cannot trace (data-dependent
control flow, dynamic shapes) work too. Modules that never run are listed with no output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .layer_tap import first_tensor
from .pooling import pool

TABLE_POOLINGS = ("avg", "max", "gem", "cls", "none")


@dataclass
class LayerRow:
    """One submodule: dotted name, type, output shape (of one image's batch of 1), embedding sizes."""

    name: str
    module_type: str
    shape: Optional[tuple[int, ...]] = None
    sizes: dict[str, Optional[int]] = field(default_factory=dict)
    note: str = ""


class ForwardFailed(Exception):
    """The forward pass raised: the rows of the layers that ran before, and where it stopped."""

    def __init__(self, cause: BaseException, ran: list[LayerRow], inside: list[str], last: Optional[str]) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.ran = ran  # layers whose output was seen, in the order they first returned
        self.inside = inside  # modules entered but not left when it raised, outermost first
        self.last = last  # the last module that returned (a shared one may return several times)

    def where(self, model_type: str) -> str:
        """Where to look: the innermost module still running, or the model's own forward."""
        if self.inside:
            return f"inside `{self.inside[-1]}`"
        after = f", after `{self.last}`" if self.last else ""
        return f"in {model_type}.forward itself{after}"


def embedding_sizes(output: torch.Tensor, channel_axis: int = 1) -> dict[str, Optional[int]]:
    """The embedding length each pooling gives for this layer output (None: that pooling doesn't apply)."""
    sizes: dict[str, Optional[int]] = {}
    for method in TABLE_POOLINGS:
        try:
            sizes[method] = int(pool(output.float(), method, channel_axis).shape[1])
        except (ValueError, RuntimeError, IndexError):
            sizes[method] = None
    return sizes


def layer_table(model: torch.nn.Module, input_shape: Sequence[int], channel_axis: int = 1) -> list[LayerRow]:
    """Run one zero-filled (1, *input_shape) batch through `model` with a hook on every submodule."""
    rows: dict[str, LayerRow] = {}
    ran: list[LayerRow] = []  # in the order layers returned
    running: list[str] = []  # entered, not yet returned
    last: list[str] = []  # the last module that returned
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        rows[name] = LayerRow(name, type(module).__name__)

        def enter(mod: torch.nn.Module, inputs: object, name: str = name) -> None:
            running.append(name)

        def hook(mod: torch.nn.Module, inputs: object, output: object, name: str = name) -> None:
            if running and running[-1] == name:
                running.pop()
            last[:] = [name]
            row = rows[name]
            if row.shape is not None:  # called again (a shared module): the first call counts
                row.note = "called more than once; first call shown"
                return
            ran.append(row)
            tensor = first_tensor(output)
            if tensor is None:
                row.note = f"returns {type(output).__name__}, not a tensor"
                return
            row.shape = tuple(tensor.shape)
            if tensor.dim() >= 2:
                row.sizes = embedding_sizes(tensor.detach(), channel_axis)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), dtype=torch.float32))
    except Exception as exc:
        raise ForwardFailed(exc, ran, list(running), last[0] if last else None) from exc
    finally:
        for handle in handles:
            handle.remove()
    for row in rows.values():
        if row.shape is None and not row.note:
            row.note = "did not run"
    return list(rows.values())


def format_table(rows: Sequence[LayerRow]) -> str:
    """A plain-text table: name, type, output shape, one column per pooling."""
    header = ["layer", "type", "output shape", *TABLE_POOLINGS, "note"]
    lines = [header]
    for r in rows:
        shape = "x".join(str(d) for d in r.shape) if r.shape is not None else "-"
        sizes = [("-" if r.sizes.get(p) is None else str(r.sizes[p])) for p in TABLE_POOLINGS]
        lines.append([r.name, r.module_type, shape, *sizes, r.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
