"""How every served benchmark measures: the models, the archives TorchServe serves (servings), what
clients send (cases and payloads), the in-process limits, rows timed in interleaved rounds with their
answers checked, and one report.

A suite is data: servings x cases. Every (model, case, serving) is a row, divided by the case's
limit: the engine in this process doing the worker's exact work on the same payload (limits.py).
Rows run once per round, in a fixed order, so load from elsewhere hits every row alike; the median
round is shown with its spread, and latency percentiles over every request of every round.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch

from image_embedder.encoder import ImageEncoder
from image_embedder.errors import RequestError
from image_embedder.image_decoding import ImageDecoder
from image_embedder.npy_codec import read_npy
from image_embedder.settings import EncoderSettings
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.example_build import example_files, resnet_files
from image_embedder_testkit.imagenet import IMAGENET
from image_embedder_testkit.photos import jpegs
from image_embedder_tools.ts_defaults import DEFAULT_TS_CONFIG

from .bench_client import RunResult

QUIET_LOAD = 1.5  # a run that starts above this load average says its figures are not for the docs
SHAPE = (3, 224, 224)
NPY = "application/x-npy"
SERVER_SIDE = {**IMAGENET, "resize": 256, "center_crop": 224}  # every archive: uint8 pixels and JPEGs mean the same
SPINNING = {"GOMP_SPINCOUNT": None}  # libgomp's default: threads spin ~10 ms after each parallel region
PASSIVE = {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"}  # threads sleep at once
TRIM_64 = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}  # a trim 1/16 of ours
SERIAL_GC = {"JAVA_TOOL_OPTIONS": "-XX:+UseSerialGC -Xms1g -Xmn512m"}  # the frontend's JVM: no G1 humongous bodies
DEFAULT_DELAY_MS: int = DEFAULT_TS_CONFIG["maxBatchDelay"]  # the build's, so the shipped serving is the build's
Images = Union[np.ndarray, tuple]  # a uint8/float32 batch, or encoded JPEG files


def cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Engine:
    """A model as an archive serves it, rebuilt in any process (a limit's team members too)."""

    name: str
    model_file: str
    model_class: str
    state_dict: str
    layer: str
    settings: tuple = tuple(SERVER_SIDE.items())  # (key, value) pairs

    def encoder(self, threads: int, **extra: object) -> ImageEncoder:
        torch.set_num_threads(threads)
        settings = EncoderSettings.from_mapping({
            "model_definition_file": os.path.basename(self.model_file), "model_class_name": self.model_class,
            "model_state_dict_path": os.path.basename(self.state_dict), "layer_name": self.layer,
            "num_threads": threads, **dict(self.settings), **extra})
        return ImageEncoder(settings, os.path.dirname(self.model_file))

    def work(self, threads: int, images: Images, **extra: object) -> tuple[ImageEncoder, Callable[[], np.ndarray]]:
        """One request's work as the worker does it: a batch, or encoded images decoded by a pool of
        `threads` threads, then prepare + forward (early exit) + pooling; returns the embeddings.
        A refusal raises: a limit must never time an error."""
        from concurrent.futures import ThreadPoolExecutor

        encoder = self.encoder(threads, **extra)
        if isinstance(images, np.ndarray):
            return encoder, lambda: _embedded(encoder.embed_requests([[images]]))
        decoder = ImageDecoder.from_settings(encoder.settings)
        pool = ThreadPoolExecutor(threads)
        return encoder, lambda: _embedded(encoder.embed_requests([list(pool.map(decoder.decode, images))]))


def _embedded(results: list) -> np.ndarray:
    [result] = results
    if isinstance(result, RequestError):
        raise result
    return result


def make_engines(work: str, names: list[str]) -> dict[str, Engine]:
    """The example at conv1 and examples/resnet's ResNet-18 at layer4, each with its seeded weights."""
    engines = {}
    for name in names:
        folder = os.path.join(work, name)
        if name == "example":
            model_file, weights = example_files(folder)
            engines[name] = Engine(name, model_file, "CustomModel", weights, "conv1")
        elif name == "resnet18":
            model_file, weights = resnet_files(folder)
            engines[name] = Engine(name, model_file, "ResNet18", weights, "layer4")
        else:
            raise SystemExit(f"bench: unknown model {name!r}; choose from example, resnet18")
    return engines


@dataclass(frozen=True, kw_only=True)
class Serving:
    """How one archive runs: workers (None: one per core), torch threads (None: shared by the busy
    workers; 0: every core), TorchServe batching, handler settings over the model's, the server's
    environment over the launchers' (each environment and `launcher_logs` gets a TorchServe of its own;
    False: TorchServe's own log4j2.xml). A `noop` serving answers without reading the body: what
    TorchServe alone costs. `default`: run without a choice."""

    id: str
    title: str
    workers: Optional[int] = None
    threads: Optional[int] = None
    batch_size: int = DEFAULT_TS_CONFIG["batchSize"]
    delay_ms: int = DEFAULT_DELAY_MS
    settings: Mapping[str, object] = field(default_factory=dict)
    env: Mapping[str, Optional[str]] = field(default_factory=dict)
    launcher_logs: bool = True
    noop: bool = False
    default: bool = True


def server_key(serving: Serving) -> tuple:
    """Servings with the same key share one TorchServe: its environment and its log config."""
    return tuple(sorted(serving.env.items())), serving.launcher_logs


SHIPPED = Serving(id="shipped", title="our archive, shipped defaults")
NOOPS = (Serving(id="noop", title="no-op, batchSize 1 (transport)", batch_size=1, noop=True),
         Serving(id="noop-batched", title="no-op, batched as ours", noop=True))


def archive_name(model: str, serving: Serving) -> str:
    return serving.id if serving.noop else f"{model}-{serving.id}"


@dataclass(frozen=True, kw_only=True)
class Case:
    """What clients send: a payload, how many clients at once, requests each per round, over `rest`
    (requests sessions) or `grpc` (TorchServe's gRPC inference API); the limit it is divided by:
    `single` (one stream, every thread) or `team` (the best layout)."""

    id: str
    title: str
    payload: str
    clients: int = 1
    per_client: int = 2
    limit: str = "single"
    limit_payload: str = ""  # the work the limit times, when not the payload itself
    transport: str = "rest"
    models: tuple = ("example", "resnet18")
    quick: bool = True


@dataclass(frozen=True)
class Payload:
    """Images and how they travel: `npy`, `json` ({"data": ...}), `multipart` (a part per JPEG) or
    `jpeg` (one raw body); `accept`: the answer's type (.npy, or JSON when None)."""

    images: Images
    send: str = "npy"
    accept: Optional[str] = NPY

    def body(self) -> tuple[bytes, dict]:
        accept = {"Accept": self.accept} if self.accept else {}
        if self.send == "npy":
            array = self.images if len(self.images) > 1 else self.images[0]
            return npy_bytes(array), {"Content-Type": NPY, **accept}
        if self.send == "json":
            data = json.dumps({"data": self.images.tolist()}, separators=(",", ":")).encode()
            return data, {"Content-Type": "application/json", **accept}
        if self.send == "jpeg":
            return self.images[0], {"Content-Type": "image/jpeg", **accept}
        import urllib3

        body, content_type = urllib3.encode_multipart_formdata(
            [(f"img{i}", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(self.images)])
        return body, {"Content-Type": content_type, **accept}


@functools.cache
def _u8(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, *SHAPE), dtype=np.uint8)


PAYLOADS: dict[str, Callable[[], Payload]] = {
    "tiny": lambda: Payload(np.random.default_rng(0).integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)),
    "u8_1": lambda: Payload(_u8(32)[:1]),
    "u8_16": lambda: Payload(_u8(32)[:16]),
    "u8_32": lambda: Payload(_u8(32)),
    "u8_32_json_answer": lambda: Payload(_u8(32), accept=None),
    "f32_32": lambda: Payload(_u8(32).astype(np.float32)),
    "json_u8_32": lambda: Payload(_u8(32), send="json"),
    "jpeg640_16": lambda: Payload(jpegs(16, 640, 480, 1), send="multipart"),
    "jpeg1280_16": lambda: Payload(jpegs(16, 1280, 960, 3), send="multipart"),
    "jpeg1080_16": lambda: Payload(jpegs(16, 1920, 1080, 2), send="multipart"),
    "jpeg1080_1": lambda: Payload(payload("jpeg1080_16").images[:1], send="jpeg"),
}


@functools.cache
def payload(name: str) -> Payload:
    return PAYLOADS[name]()


@dataclass
class Row:
    """One measured row: `run` once per round; its images/s and latencies over rounds."""

    model: str
    case: str
    label: str
    kind: str  # limit | served | noop | peer
    images: int
    run: Callable[[], RunResult]
    results: list[RunResult] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [r.requests * self.images / r.wall_s for r in self.results]

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.results else float("nan")

    def latency_ms(self, percentile: float) -> Optional[float]:
        latencies = [x for r in self.results for x in r.latencies_s]
        return float(np.percentile(latencies, percentile) * 1000) if latencies else None

    @property
    def errors(self) -> list[str]:
        return [e for r in self.results for e in r.errors]


def run_rounds(rows: list[Row], rounds: int) -> None:
    """Every row once per round, in a fixed order: load from elsewhere hits every row alike."""
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        for row in rows:
            row.results.append(row.run())


def check_answer(sample: Optional[bytes], expected: np.ndarray, where: str) -> Optional[str]:
    """None when a served answer (.npy or JSON) equals the in-process embedding, else the problem."""
    if sample is None:
        return f"{where}: no answer to check"
    got = read_npy(sample) if sample[:6] == b"\x93NUMPY" else np.asarray(json.loads(sample)["embeddings"], np.float32)
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    return None if diff <= 1e-3 else f"{where}: served embedding differs from in-process by {diff:.2e}"
