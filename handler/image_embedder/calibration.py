"""What an archive learned from the user's own images at build time (`--calibration`), and the
quantizers and whitening it makes possible.

- **Whitening** (`--whiten K`, Jégou & Chum, ECCV 2012; the GeM retrieval pipeline of Radenović,
  Tolias & Chum, TPAMI 2018): PCA fitted on the calibration images' pooled vectors, the K components
  with the most variance each scaled by eigenvalue^(-power/2): `(x - mean) @ projection`. power 1
  (default) is full whitening, 0 the PCA rotation alone, between them a shrinkage that amplifies
  low-variance directions less (a trained, already discriminative layer loses from full whitening:
  docs/digits.md). Applied on the device after pooling; with `normalize: true` the vectors are
  L2-normalized before whitening as well as after, as in that pipeline.
- **Quantization** of the final vectors (after whitening, normalization and `dimensions`), from the
  calibration vectors' per-dimension statistics, as sentence-transformers' `quantize_embeddings`
  does for int8/uint8 (min..max in 256 steps) and with per-dimension medians as binary thresholds
  (pooled CNN features are non-negative, so the sign would say nothing):
  uint8 `q = clip(rint((x - low) / step), 0, 255)` with `step = (high - low) / 255` (1 where high == low),
  int8 `q - 128`, binary `packbits(x > median)` (first dimension in the high bit, numpy's order).

The archive holds the calibration vectors themselves (at most MAX_SAMPLE, at full width), so the
statistics of any `dimensions k` (renormalized when the archive normalizes) are computed from them
exactly; `describe` reports how many images were calibrated on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ConfigError

CALIBRATED_DTYPES = ("int8", "uint8", "binary")
MAX_SAMPLE = 4096  # calibration vectors kept in the archive
EIGEN_FLOOR = 1e-9  # relative to the largest eigenvalue: directions without variance are not amplified


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row L2-normalized, as torch.nn.functional.normalize does (norms floored at 1e-12)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Whitening:
    """PCA-whitening to K dimensions: `(x - mean) @ projection`."""

    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (D, K) float32
    eigenvalues: np.ndarray  # (K,) float32, descending
    power: float = 1.0

    @classmethod
    def fit(cls, vectors: np.ndarray, k: int, power: float = 1.0) -> "Whitening":
        """Fitted on (M, D) vectors (float64 maths); K at most D and below M."""
        m, d = vectors.shape
        if not 0 < k <= d:
            raise ConfigError(f"--whiten {k}: the layer gives {d} dimensions; whiten to 1..{d}")
        if k >= m:
            raise ConfigError(f"--whiten {k} needs more than {k} calibration images, got {m}")
        if not 0 <= power <= 1:
            raise ConfigError(f"--whiten-power {power} must lie in 0..1 (1: full whitening, 0: PCA alone)")
        x = vectors.astype(np.float64)
        mean = x.mean(axis=0)
        values, vectors_ = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        order = np.argsort(values)[::-1][:k]
        values = np.maximum(values[order], EIGEN_FLOOR * max(values.max(), EIGEN_FLOOR))
        projection = vectors_[:, order] / values ** (power / 2)
        return cls(mean.astype(np.float32), projection.astype(np.float32), values.astype(np.float32), power)


@dataclass
class Calibration:
    """The calibration vectors (final, full width) and what was fitted; quantizer statistics per width."""

    sample: np.ndarray  # (M, D) float32
    images: int
    whitening: Optional[Whitening] = None
    _stats: dict = field(default_factory=dict, repr=False)

    def save(self, path: str) -> None:
        arrays = {"sample": self.sample, "images": np.asarray(self.images)}
        if self.whitening is not None:
            arrays.update(whiten_mean=self.whitening.mean, whiten_projection=self.whitening.projection,
                          whiten_eigenvalues=self.whitening.eigenvalues, whiten_power=np.asarray(self.whitening.power))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        with np.load(path, allow_pickle=False) as f:
            whitening = (Whitening(f["whiten_mean"], f["whiten_projection"], f["whiten_eigenvalues"],
                                   float(f["whiten_power"])) if "whiten_projection" in f else None)
            return cls(f["sample"].astype(np.float32), int(f["images"]), whitening)

    def stats(self, k: int, normalized: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(low, step, median) per dimension of the calibration vectors cut to the first k (renormalized
        when `normalized`), as the answers are."""
        key = (k, normalized)
        if key not in self._stats:
            x = self.sample[:, :k].astype(np.float64)
            if normalized and k != self.sample.shape[1]:
                x = unit_rows(x)
            low, high = x.min(axis=0), x.max(axis=0)
            step = np.where(high > low, (high - low) / 255.0, 1.0)
            self._stats[key] = (low, step, np.median(x, axis=0))
        return self._stats[key]

    def describe(self) -> dict:
        return {"images": self.images, "dimensions": int(self.sample.shape[1]),
                "whiten": None if self.whitening is None else int(self.whitening.projection.shape[1]),
                "whiten_power": None if self.whitening is None else self.whitening.power}


def quantize(vectors: np.ndarray, dtype: str, calibration: Calibration, normalized: bool) -> np.ndarray:
    """(N, k) float32 final vectors as `dtype` (one of CALIBRATED_DTYPES)."""
    low, step, median = calibration.stats(vectors.shape[1], normalized)
    if dtype == "binary":
        return np.packbits(vectors > median, axis=1)
    q = np.clip(np.rint((vectors.astype(np.float64) - low) / step), 0, 255)
    return (q - 128).astype(np.int8) if dtype == "int8" else q.astype(np.uint8)
