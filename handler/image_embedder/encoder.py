"""The engine: a loaded model, its layer tap and pooling, run over batches of images.

No TorchServe here: the handler, the build script, the benchmark and the tests all use this.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import ConfigError, RequestError, as_answer, bad_request
from .layer_tap import LayerTap
from .loading import ModelSource
from .pooling import Pooling, pool_layers
from .preprocessing import summary as preprocessing_summary
from .calibration import CALIBRATED_DTYPES, Calibration
from .output_options import OUTPUT_DTYPES, OutputOptions, shape_output
from .settings import EncoderSettings

ArrayLike = Union[np.ndarray, torch.Tensor]


def resolve_device(requested: Optional[str], gpu_id: Optional[int] = None) -> torch.device:
    """An explicit setting wins; else the GPU TorchServe assigned when CUDA is there; else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} was asked for but CUDA is not available here")
        return device
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def _as_tensor(array: ArrayLike) -> torch.Tensor:
    """A tensor over the same memory, read-only buffers included (they are only read from)."""
    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.ascontiguousarray(array))


def _shares(tensor: torch.Tensor, source: ArrayLike) -> bool:
    """Whether `tensor` is the caller's memory (so normalizing in place would change their data)."""
    if isinstance(source, torch.Tensor):
        return tensor.data_ptr() == source.data_ptr()
    return tensor.device.type == "cpu"


def hwc_hint(shape: Sequence[int]) -> str:
    """A hint for an image sent channels-last: (H, W, C) with C in 1/3/4 and H not."""
    if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
        return f"; {tuple(shape)} looks like (H,W,C): send (C,H,W), e.g. numpy's image.transpose(2, 0, 1)"
    return ""


class ImageEncoder:
    """Embeds image batches with the tapped layer of a user's model."""

    def __init__(self, settings: EncoderSettings, model_dir: str = ".", device: Optional[torch.device] = None,
                 model: Optional[torch.nn.Module] = None) -> None:
        """The model is loaded from `settings` (files in `model_dir`), unless the caller already built it with
        its weights and passes it as `model` (the archive builder, which loaded them to clean them)."""
        self.settings = settings
        self.device = device if device is not None else resolve_device(settings.device)
        self.pass_size = settings.pass_size(self.device.type)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        if model is None:
            model = ModelSource.from_settings(settings, model_dir).load(str(self.device))
        else:
            model = model.to(self.device).eval()
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.pooling = Pooling.from_settings(settings)
        self.calibration: Optional[Calibration] = None
        if settings.calibration_file:
            self.calibration = Calibration.load(os.path.join(model_dir, settings.calibration_file))
            whitening = self.calibration.whitening
            if whitening is not None:
                self.pooling = self.pooling.whitened(whitening.mean, whitening.projection, self.device)
        elif settings.output_dtype in CALIBRATED_DTYPES:
            raise ConfigError(f"output_dtype {settings.output_dtype} quantizes with what the archive learned from your "
                              "images: build with --calibration DIR|FILE.npy (or choose float32, float16)")
        self.tap = LayerTap(model, settings.layer_names, early_exit=settings.early_exit and not settings.compile)
        self._forward = torch.compile(model) if settings.compile else model
        self._mean = self._channel_vector(settings.mean)
        self._std = self._channel_vector(settings.std)
        self.embedding_dim: Optional[int] = None
        self.before_pass: Callable[[], Any] = lambda: None  # called before every forward pass (thread sizing)
        if settings.input_shape:
            try:
                self.embedding_dim = int(self.embed(np.zeros((1, *settings.input_shape), np.float32)).shape[1])
            except Exception as exc:  # the model refuses this shape: say so at build/load, not as a traceback
                raise ConfigError(
                    f"one forward pass on input_shape {list(settings.input_shape)} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if settings.dimensions is not None and settings.dimensions > self.embedding_dim:
                raise ConfigError(f"dimensions {settings.dimensions} is more than the {self.embedding_dim} "
                                  f"dimensions layer {settings.layer_name!r} gives; use at most {self.embedding_dim}")

    def _channel_vector(self, values: Optional[Sequence[float]]) -> Optional[torch.Tensor]:
        if values is None:
            return None
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.settings.dtype))

    def prepare(self, images: Sequence[ArrayLike]) -> torch.Tensor:
        """One float32 batch on the device from arrays of the same image shape, normalized per the settings."""
        first = images[0]
        borrowed = None  # a float32 input used as it is, never modified in place
        if len(images) == 1 and isinstance(first, torch.Tensor) and first.dtype == torch.float32:
            borrowed = first.to(self.device)
        elif len(images) == 1 and isinstance(first, np.ndarray) and first.dtype == np.float32 and first.flags.writeable:
            borrowed = torch.from_numpy(first).to(self.device)
        if borrowed is not None:
            return self._normalize(borrowed.clone() if self._normalizes and _shares(borrowed, first) else borrowed)
        elif self.device.type == "cuda":
            batch = self._to_cuda(images)
        else:
            total = sum(len(a) for a in images)
            batch = torch.empty((total, *first.shape[1:]), dtype=torch.float32, device=self.device)
            row = 0
            for array in images:
                batch[row: row + len(array)].copy_(_as_tensor(array))
                row += len(array)
        return self._normalize(batch)

    def _to_cuda(self, images: Sequence[ArrayLike]) -> torch.Tensor:
        """Gather on the host in pinned memory, in the images' own dtype (uint8 crosses PCIe as uint8:
        4x fewer bytes), copy without blocking the host, convert to float32 on the device."""
        tensors = [_as_tensor(a) for a in images]
        if any(t.device.type != "cpu" for t in tensors):  # already on a device: nothing to pin
            return torch.cat([t.to(self.device).float() for t in tensors])
        dtype = torch.uint8 if all(t.dtype == torch.uint8 for t in tensors) else torch.float32
        host = torch.empty((sum(len(t) for t in tensors), *tensors[0].shape[1:]), dtype=dtype, pin_memory=True)
        torch.cat([t.to(dtype) for t in tensors], out=host)
        return host.to(self.device, non_blocking=True).float()

    @property
    def _normalizes(self) -> bool:
        return self.settings.scale is not None or self._mean is not None or self._std is not None

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """scale, then mean, then std, in place on a batch this encoder owns."""
        s = self.settings
        if not self._normalizes:
            return batch
        if s.scale is not None:
            batch.mul_(s.scale)
        channels = batch.shape[1]
        for name, vector, op in (("mean", self._mean, batch.sub_), ("std", self._std, batch.div_)):
            if vector is None:
                continue
            if vector.numel() not in (1, channels):
                raise bad_request(
                    f"images have {channels} channels but the {name} setting has {vector.numel()} values",
                    "ChannelMismatch",
                )
            op(vector.view(1, -1, *([1] * (batch.dim() - 2))))
        return batch

    def embed_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass over a prepared batch: the (N, D) float32 embeddings, on the device."""
        if self.settings.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            return pool_layers(self.tap(batch, self._forward), self.pooling)

    def rows_per_pass(self, image_shape: Sequence[int]) -> int:
        """How many images of this shape one forward pass may hold (default_batch_size, max_batch_pixels)."""
        per_image = max(1, math.prod(image_shape))
        return max(1, min(self.pass_size, self.settings.max_batch_pixels // per_image))

    def embed_prepared(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings of a prepared batch of any size, in forward passes of at most rows_per_pass images."""
        step = self.rows_per_pass(batch.shape[1:])
        parts = []
        for i in range(0, len(batch), step):
            self.before_pass()
            parts.append(self.embed_batch(batch[i: i + step]))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.float().cpu().numpy()

    def embed(self, images: ArrayLike) -> np.ndarray:
        """(N, D) float32 embeddings of an image batch (N, C, H, W) or one image (C, H, W)."""
        if images.ndim == 3:
            images = images[None]
        return self.embed_prepared(self.prepare([images]))

    def embed_requests(self, requests: Sequence[Sequence[np.ndarray]]) -> list[Union[np.ndarray, RequestError]]:
        """Embed the image batches of many requests together and hand each request its own rows.

        Images of the same shape share forward passes across requests; each shape is its own group,
        so a shape the model rejects (422) fails only the requests that sent it.
        """
        groups: "OrderedDict[tuple, list[tuple[int, int]]]" = OrderedDict()
        for r, arrays in enumerate(requests):
            for p, array in enumerate(arrays):
                groups.setdefault(tuple(array.shape[1:]), []).append((r, p))
        pieces: dict[tuple[int, int], np.ndarray] = {}
        failures: dict[int, RequestError] = {}
        for shape, members in groups.items():
            try:
                batch = self.prepare([requests[r][p] for r, p in members])
                embeddings = self.embed_prepared(batch)
            except RequestError as exc:
                error = RequestError(exc.status, exc.kind, exc.message + hwc_hint(shape)) if hwc_hint(shape) else exc
                failures.update({r: as_answer(error) for r, _ in members})
                continue
            except torch.OutOfMemoryError as exc:
                failures.update({r: RequestError(507, "OutOfMemory", f"out of memory for images of shape {shape}: {exc}") for r, _ in members})
                continue
            except Exception as exc:  # the model's forward refused this shape
                message = f"the model cannot embed images of shape {shape}: {type(exc).__name__}: {exc}{hwc_hint(shape)}"
                failures.update({r: RequestError(422, "ModelRejectedInput", message) for r, _ in members})
                continue
            if self.embedding_dim is None:  # learned from the first pass when the archive had no input_shape
                self.embedding_dim = int(embeddings.shape[1])
            row = 0
            for r, p in members:
                n = len(requests[r][p])
                pieces[(r, p)] = embeddings[row: row + n]
                row += n
        results: list[Union[np.ndarray, RequestError]] = []
        for r, arrays in enumerate(requests):
            if r in failures:
                results.append(failures[r])
            else:
                parts = [pieces[(r, p)] for p in range(len(arrays))]
                results.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return results

    def shape(self, embeddings: np.ndarray, output: OutputOptions) -> np.ndarray:
        """One request's (N, D) float32 embeddings in the dtype and dimensions it asks for, else the
        archive's (output_options); a RequestError for a choice this archive can't answer."""
        s = self.settings
        return shape_output(embeddings, output.over(s.output), s.normalize, self.calibration)

    def describe(self) -> dict:
        """What is served (model class, layers, pooling, device, embedding size, known once one pass ran)
        and what a client must know to send images: expected shape, preprocessing, limits."""
        s = self.settings
        return {
            "model_class": s.model_class_name,
            "model_type": type(self.model).__name__,
            "layer_name": list(s.layer_names) if len(s.layer_names) > 1 else s.layer_names[0],
            "pooling": s.pooling,
            "normalize": s.normalize,
            "device": str(self.device),
            "embedding_dim": self.embedding_dim,
            "input_shape": list(s.input_shape) if s.input_shape else None,
            "channels": s.input_shape[0] if s.input_shape else None,
            "dtype": s.dtype,
            "default_batch_size": self.pass_size,
            "preprocessing": {  # applied by the server, in this order: decode, resize, crop, scale, mean, std
                "color_mode": s.color_mode,
                "resize": s.resize,
                "center_crop": s.center_crop,
                "scale": s.scale,
                "mean": list(s.mean) if s.mean is not None else None,
                "std": list(s.std) if s.std is not None else None,
                "summary": preprocessing_summary(s),
            },
            "limits": {"max_images_per_request": s.max_images_per_request, "max_batch_pixels": s.max_batch_pixels},
            "output": {"dtype": s.output_dtype, "dimensions": s.dimensions,
                       "dtypes": [d for d in OUTPUT_DTYPES if self.calibration or d not in CALIBRATED_DTYPES],
                       "calibration": self.calibration.describe() if self.calibration else None},
        }
