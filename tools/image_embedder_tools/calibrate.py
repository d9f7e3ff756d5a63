"""`build --calibration DIR|FILE.npy [--whiten K]`: run the user's own images through the archive's own
preprocessing and model, fit the whitening, and keep the final vectors for the quantizers
(image_embedder.calibration says what each is). Images: PNG/JPEG files (decoded, resized and
cropped as the archive's settings say) and .npy files of one image (C,H,W) or a batch (N,C,H,W),
found in a folder (recursively, sorted) or given as one .npy file."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from image_embedder.calibration import MAX_SAMPLE, Calibration, Whitening
from image_embedder.encoder import ImageEncoder
from image_embedder.errors import ConfigError, RequestError
from image_embedder.image_decoding import ImageDecoder
from image_embedder.pooling import after_pooling

CALIBRATION_FILE = "calibration.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def calibration_files(path: str) -> list[str]:
    """The image and .npy files of `path` (a folder, walked in sorted order, or one file)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"--calibration {path!r} is neither a folder nor a file")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.lower().endswith((*IMAGE_SUFFIXES, ".npy")))
    if not files:
        raise ConfigError(f"--calibration {path!r} holds no PNG, JPEG or .npy files")
    return files


def calibration_batches(path: str, decoder: ImageDecoder) -> Iterator[np.ndarray]:
    """One (N, C, H, W) batch per file, as the archive's server would read it."""
    for file in calibration_files(path):
        if file.lower().endswith(".npy"):
            array = np.load(file, allow_pickle=False)
            yield array[None] if array.ndim == 3 else array
            continue
        with open(file, "rb") as f:
            try:
                yield decoder.decode(f.read(), os.path.basename(file))
            except RequestError as exc:
                raise ConfigError(f"--calibration: {file}: {exc.message}") from exc


def raw_vectors(encoder: ImageEncoder, path: str) -> np.ndarray:
    """The pooled vectors of every calibration image, before whitening and normalization."""
    decoder = ImageDecoder.from_settings(encoder.settings)
    plain = dataclasses.replace(encoder.pooling, normalize=False, whitening=None)
    kept, encoder.pooling = encoder.pooling, plain
    try:
        batches = list(calibration_batches(path, decoder))
        results = encoder.embed_requests([[batch] for batch in batches])
    finally:
        encoder.pooling = kept
    for file_batch, result in zip(batches, results):
        if isinstance(result, RequestError):
            raise ConfigError(f"--calibration: images of shape {tuple(file_batch.shape[1:])}: {result.message}")
    return np.concatenate(results).astype(np.float32)


def calibrate(encoder: ImageEncoder, path: str, whiten: Optional[int], root: str,
              say: Callable[..., None], whiten_power: float = 1.0) -> str:
    """Write the archive's calibration file into `root`; returns its name (the `calibration_file` setting).
    The vectors go through what the server does after pooling (pooling.after_pooling): the whitening is
    fitted on them as its input (L2-normalized when normalize is on), the quantizers on its output."""
    raw = torch.from_numpy(raw_vectors(encoder, path))
    plain = dataclasses.replace(encoder.pooling, whitening=None)
    final = after_pooling(raw, plain).numpy()  # what whitening sees, and without whitening the answer
    whitening = Whitening.fit(final, whiten, whiten_power) if whiten else None
    if whitening is not None:
        final = after_pooling(raw, plain.whitened(whitening.mean, whitening.projection)).numpy()
    keep = np.linspace(0, len(final) - 1, min(len(final), MAX_SAMPLE)).round().astype(int)
    Calibration(final[keep].astype(np.float32), len(final), whitening).save(os.path.join(root, CALIBRATION_FILE))
    say(f"calibration: {len(final)} images from {path}" + (f", whitened {raw.shape[1]} -> {whiten} dimensions"
                                                             if whitening else f", {raw.shape[1]} dimensions"))
    return CALIBRATION_FILE
