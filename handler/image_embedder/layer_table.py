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
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        rows[name] = LayerRow(name, type(module).__name__)

        def hook(mod: torch.nn.Module, inputs: object, output: object, name: str = name) -> None:
            row = rows[name]
            if row.shape is not None:  # called again (a shared module): the first call counts
                row.note = "called more than once; first call shown"
                return
            tensor = first_tensor(output)
            if tensor is None:
                row.note = f"returns {type(output).__name__}, not a tensor"
                return
            row.shape = tuple(tensor.shape)
            if tensor.dim() >= 2:
                row.sizes = embedding_sizes(tensor.detach(), channel_axis)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), dtype=torch.float32))
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
