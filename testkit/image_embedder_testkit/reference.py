"""Independent reference embeddings for tests: the model, a plain forward hook, pooling written out.

Deliberately shares no code with image_embedder, so a bug there can't hide in both.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import uuid

import numpy as np
import torch


def load_reference_model(model_file: str, class_name: str, state_dict: str | None = None, kwargs: dict | None = None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(model_file)))
    spec = importlib.util.spec_from_file_location(f"_ref_{uuid.uuid4().hex}", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, class_name)(**(kwargs or {}))
    if state_dict:
        model.load_state_dict(torch.load(state_dict, weights_only=True))
    return model.eval()


def reference_embeddings(model: torch.nn.Module, layer: str, images: np.ndarray, pooling: str = "avg",
                         channel_axis: int = 1, gem_p: float = 3.0, normalize: bool = False) -> np.ndarray:
    """Run the whole forward pass with a hook on `layer` (one name, or several joined by commas) and pool."""
    layers = layer.split(",") if isinstance(layer, str) else list(layer)
    captured = {}
    handles = []
    for name in layers:
        module = model.get_submodule(name)
        def hook(m, i, o, name=name) -> None:  # must return None: a returned tensor replaces the output
            captured.setdefault(name, (o[0] if isinstance(o, tuple) else o).detach().clone())

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(images, dtype=np.float32))
            if x.dim() == 3:
                x = x.unsqueeze(0)
            model(x)
    finally:
        for h in handles:
            h.remove()
    vectors = []
    for name in layers:
        out = captured[name].float()
        if out.dim() == 2:
            v = out
        elif pooling == "none":
            v = out.reshape(out.shape[0], -1)
        elif out.dim() == 3:
            v = {"avg": lambda t: t.mean(1), "max": lambda t: t.max(1).values, "cls": lambda t: t[:, 0],
                 "gem": lambda t: t.clamp(min=1e-6).pow(gem_p).mean(1).pow(1 / gem_p)}[pooling](out)
        else:
            if channel_axis != 1:
                out = torch.movedim(out, channel_axis, 1)
            if pooling == "avg":
                v = torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1) if out.dim() == 4 else out.flatten(2).mean(2)
            elif pooling == "max":
                v = torch.nn.functional.adaptive_max_pool2d(out, 1).flatten(1) if out.dim() == 4 else out.flatten(2).max(2).values
            elif pooling == "gem":
                v = out.clamp(min=1e-6).pow(gem_p).flatten(2).mean(2).pow(1 / gem_p)
            else:
                raise ValueError(pooling)
        vectors.append(v)
    result = torch.cat(vectors, 1)
    if normalize:
        result = result / result.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return result.numpy()
