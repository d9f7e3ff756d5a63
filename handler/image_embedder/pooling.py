"""Turn a layer's activations into one vector per image.

- (N, D): passed through, whatever the pooling.
- (N, T, D) tokens: `avg`/`max`/`gem` over T, `cls` takes token 0, `none` flattens.
- (N, C, *spatial) feature maps (channels at `channel_axis`): `avg` is
  AdaptiveAvgPool2d(1) (Jina's CustomImageTorchEncoder's pooling), `max` its max twin, `gem` the generalized mean, `none` flattens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

GEM_EPS = 1e-6


def _gem(x: torch.Tensor, dims: tuple[int, ...], p: float) -> torch.Tensor:
    return x.clamp(min=GEM_EPS).pow(p).mean(dim=dims).pow(1.0 / p)


def pool(features: torch.Tensor, method: str = "avg", channel_axis: int = 1, gem_p: float = 3.0) -> torch.Tensor:
    """One (N, D) float tensor from a layer output of rank 2 or more."""
    if features.dim() < 2:
        raise ValueError(f"layer output has shape {tuple(features.shape)}; need a batch axis and features")
    if features.dim() == 2:
        return features
    if method == "none":
        return features.flatten(1)
    if features.dim() == 3:
        if method == "cls":
            return features[:, 0]
        dims: tuple[int, ...] = (1,)
    else:
        if method == "cls":
            raise ValueError(
                f"pooling 'cls' takes the first token of a (N, T, D) output; this layer gives "
                f"{tuple(features.shape)}: use avg, max, gem or none"
            )
        if channel_axis not in (1, -1, features.dim() - 1):
            features = features.movedim(channel_axis, 1)
        elif channel_axis in (-1, features.dim() - 1):
            features = features.movedim(-1, 1)
        dims = tuple(range(2, features.dim()))
    if method == "avg":
        return features.mean(dim=dims)
    if method == "max":
        return features.amax(dim=dims)
    if method == "gem":
        return _gem(features, dims, gem_p)
    raise ValueError(f"unknown pooling {method!r}")


@dataclass(frozen=True)
class Pooling:
    """How tapped layers become one embedding: `method` with its `gem_p`, the feature maps' channel axis,
    an optional whitening `(mean, projection)` on the device (calibration.py), and whether the result
    is L2-normalized."""

    method: str = "avg"
    channel_axis: int = 1
    gem_p: float = 3.0
    normalize: bool = False
    whitening: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, compare=False)

    def whitened(self, mean: np.ndarray, projection: np.ndarray, device: Any = "cpu") -> "Pooling":
        """This pooling followed by `(x - mean) @ projection` on `device` (calibration.Whitening's arrays)."""
        return replace(self, whitening=(torch.from_numpy(mean).to(device), torch.from_numpy(projection).to(device)))

    @classmethod
    def from_settings(cls, settings: Any) -> "Pooling":
        """The pooling an archive's EncoderSettings ask for."""
        return cls(method=settings.pooling, channel_axis=settings.channel_axis, gem_p=settings.gem_p,
                   normalize=settings.normalize)


def pool_layers(outputs: Sequence[torch.Tensor], pooling: Pooling = Pooling()) -> torch.Tensor:
    """Pool each tapped layer, concatenate in order, whiten and L2-normalize if asked."""
    pooled = [pool(o, pooling.method, pooling.channel_axis, pooling.gem_p).float() for o in outputs]
    return after_pooling(pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1), pooling)


def after_pooling(out: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(N, D) pooled vectors whitened and L2-normalized as `pooling` says: the serving path, and the
    build's calibration (image_embedder_tools.calibrate), which must see the same vectors."""
    if pooling.whitening is not None:
        mean, projection = pooling.whitening
        if pooling.normalize:  # L2, whiten, L2: the whitening was fitted on normalized vectors
            out = torch.nn.functional.normalize(out, p=2.0, dim=1)
        out = (out - mean) @ projection
    if pooling.normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=1)
    return out
