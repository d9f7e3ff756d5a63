"""Natural-looking JPEG photos for the benchmarks, made on the spot (no data set to download).

Colour fields at several scales (a roughly 1/f spectrum, as photos have) plus fine grain, saved at
quality 90: JPEG sizes and decode times close to real photos of the same resolution.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like picture: smooth colour fields at several scales (1/f-ish) plus fine grain."""
    out = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 1.0), (12, 0.5), (48, 0.25), (192, 0.12)):
        small = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(small[:, :, c], "F").resize((width, height), Image.BICUBIC))
                          for c in range(3)], axis=2)
        out += weight * layer
    out = (out - out.mean()) / (out.std() + 1e-6) * 48 + 120 + rng.normal(0, 3, out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def jpegs(count: int, width: int, height: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        natural_image(rng, width, height).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return tuple(out)
