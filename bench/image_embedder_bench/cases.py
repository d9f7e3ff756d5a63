"""What the benchmark runs: the archives it serves, the payloads it sends, the served cases, the targets.

Plain data, each item with an `id` the other modules select by; `name` is only what the report prints.
Rows measured in process (measure.py) have ids too: `limit_b<N>` and `raw_b<N>` (the engine and a
bare forward pass on a batch of N), the JPEG limits below, and `decode_<size>_1` / `decode_<size>_all`
(the decode stage on one thread / on the worker's decode pool).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from image_embedder_bench.bench_photos import jpegs
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.imagenet import IMAGENET

SHAPE = (3, 224, 224)
NPY = "application/x-npy"
PHOTO = {"resize": 256, "center_crop": 224}  # server-side preprocessing of the JPEG archives
DRAFT = {"jpeg_draft": True, "exact_resize": False}
LIMIT_BATCHES = (1, 16, 32)  # the limit_b<N> and raw_b<N> rows


@dataclass
class ModelSpec:
    """A model to benchmark: its files, layer and handler settings."""

    name: str
    model_file: str
    model_class: str
    state_dict: str
    layer: str
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Archive:
    """One served archive of a model: a name suffix, TorchServe batching, handler settings over the model's own."""

    id: str
    suffix: str
    batch_size: int = 1
    settings: Mapping[str, object] = field(default_factory=dict)
    workers: int = 1


ARCHIVES = {a.id: a for a in (
    Archive(id="single", suffix=""),
    Archive(id="w2", suffix="_w2", settings={"num_threads": 1}, workers=2),  # docs/performance.md: the CPU layout
    Archive(id="dyn", suffix="_dyn", batch_size=16),
    Archive(id="img", suffix="_img", settings={**IMAGENET, **PHOTO}),
    Archive(id="img_dyn", suffix="_img_dyn", batch_size=16, settings={**IMAGENET, **PHOTO}),
    Archive(id="img_draft", suffix="_img_draft", settings={**IMAGENET, **PHOTO, **DRAFT}),
)}


PAYLOADS = ("u8_1", "u8_32", "u8_32_json_resp", "f32_32", "json_u8_32", "jpeg640_16", "jpeg1080_16", "jpeg1080_1")


@dataclass
class Payload:
    """A request body, encoded once: its headers, how many images it holds, what the server sees."""

    body: bytes
    headers: dict
    images: int
    array: Optional[np.ndarray] = None  # .npy/JSON payloads: the images as sent
    jpegs: tuple = ()  # JPEG payloads: the encoded images


@dataclass(frozen=True, kw_only=True)
class Case:
    """One served row: archive, payload, client kind and shape, the in-process rows it is compared with."""

    id: str
    name: str
    archive: str  # an ARCHIVES id
    payload: str  # a PAYLOADS id
    limit: str  # the id of the in-process row this one is a ratio to
    raw: Optional[str] = None  # and of the bare forward pass, for .npy payloads
    client: str = "light"
    clients: int = 1
    per_client: int = 1  # requests per client per round, times --scale
    quick: bool = False  # part of the --quick smoke run
    floor: bool = False  # also time the no-op archive on this payload
    models: tuple = ("example", "resnet18")


CASES = [
    Case(id="u8_1", name="1 client, 1 img uint8 .npy", archive="single", payload="u8_1", limit="limit_b1",
         raw="raw_b1", per_client=12, quick=True, floor=True),
    Case(id="u8_1_c16", name="16 clients, 1 img uint8 .npy", archive="dyn", payload="u8_1", limit="limit_b16",
         raw="raw_b16", clients=16, per_client=2, quick=True, floor=True),
    Case(id="u8_1_c16_requests", name="16 clients, 1 img uint8 .npy, requests", archive="dyn", payload="u8_1",
         limit="limit_b16", raw="raw_b16", client="requests", clients=16, per_client=2),
    Case(id="u8_32", name="b32 uint8 .npy", archive="single", payload="u8_32", limit="limit_b32", raw="raw_b32",
         per_client=4, quick=True, floor=True),
    Case(id="u8_32_requests", name="b32 uint8 .npy, requests", archive="single", payload="u8_32",
         limit="limit_b32", raw="raw_b32", client="requests", per_client=4, quick=True),
    Case(id="u8_32_requests_c2", name="b32 uint8 .npy, requests, 2 in flight", archive="single", payload="u8_32",
         limit="limit_b32", raw="raw_b32", client="requests", clients=2, per_client=2, quick=True),
    Case(id="u8_32_requests_c2_w2", name="b32 uint8 .npy, requests, 2 in flight, 2 workers x 1 thread",
         archive="w2", payload="u8_32", limit="limit_b32", raw="raw_b32", client="requests", clients=2,
         per_client=2),
    Case(id="f32_32_requests", name="b32 float32 .npy, requests", archive="single", payload="f32_32",
         limit="limit_b32", raw="raw_b32", client="requests", per_client=2),
    Case(id="u8_32_json_resp_requests", name="b32 uint8 .npy, JSON resp, requests", archive="single",
         payload="u8_32_json_resp", limit="limit_b32", raw="raw_b32", client="requests", per_client=2),
    Case(id="json_u8_32_requests", name="b32 uint8 as JSON, requests", archive="single", payload="json_u8_32",
         limit="limit_b32", raw="raw_b32", client="requests", per_client=1, floor=True),
    Case(id="jpeg640_16_requests", name="16 JPEG 640x480 multipart, requests", archive="img", payload="jpeg640_16",
         limit="jpeg_limit_640x480", client="requests", per_client=2, quick=True),
    Case(id="jpeg640_16_requests_c2", name="16 JPEG 640x480 multipart, requests, 2 in flight", archive="img",
         payload="jpeg640_16", limit="jpeg_limit_640x480", client="requests", clients=2, per_client=1),
    Case(id="jpeg1080_16_requests", name="16 JPEG 1920x1080 multipart, requests", archive="img",
         payload="jpeg1080_16", limit="jpeg_limit_1920x1080", client="requests", per_client=1, floor=True,
         models=("resnet18",)),
    Case(id="jpeg1080_1_c16", name="16 clients, 1 JPEG 1920x1080", archive="img_dyn", payload="jpeg1080_1",
         limit="jpeg_limit_1920x1080", clients=16, per_client=1, models=("resnet18",)),
    Case(id="jpeg1080_16_draft", name="16 JPEG 1920x1080 multipart, draft", archive="img_draft",
         payload="jpeg1080_16", limit="jpeg_limit_1920x1080_draft", client="requests", per_client=1,
         models=("resnet18",)),
]


@dataclass(frozen=True, kw_only=True)
class JpegLimit:
    """An in-process JPEG row: the worker's decode pool + prepare + forward on a multipart payload's images."""

    id: str
    name: str
    payload: str
    decode: Mapping[str, object] = field(default_factory=dict)  # ImageDecoder options over PHOTO's
    models: tuple = ("example", "resnet18")


JPEG_LIMITS = (
    JpegLimit(id="jpeg_limit_640x480", name="jpeg limit 640x480", payload="jpeg640_16"),
    JpegLimit(id="jpeg_limit_1920x1080", name="jpeg limit 1920x1080", payload="jpeg1080_16", models=("resnet18",)),
    JpegLimit(id="jpeg_limit_1920x1080_draft", name="jpeg limit 1920x1080 draft", payload="jpeg1080_16",
              decode=DRAFT, models=("resnet18",)),
)
DECODE_PAYLOADS = {"jpeg640_16": "640x480", "jpeg1080_16": "1920x1080"}  # payload id -> size in row ids and names


@dataclass(frozen=True, kw_only=True)
class Target:
    """A ratio the bench reports as met or missed: row over ref (ids of one model's rows) against a goal."""

    id: str
    label: str
    model: str
    row: str
    ref: str
    goal: float


TARGETS = [
    Target(id="example_b32_c2", label="example b32 uint8, requests x2 in flight / limit", model="example",
           row="u8_32_requests_c2", ref="limit_b32", goal=0.70),
    Target(id="example_b32", label="example b32 uint8, one requests client / limit", model="example",
           row="u8_32_requests", ref="limit_b32", goal=0.50),
    Target(id="resnet18_b32", label="resnet18 b32 uint8, requests / limit", model="resnet18",
           row="u8_32_requests", ref="limit_b32", goal=0.90),
    Target(id="resnet18_c16", label="resnet18 16 clients 1 img / limit b16", model="resnet18",
           row="u8_1_c16", ref="limit_b16", goal=0.90),
    Target(id="resnet18_jpeg640", label="resnet18 16 JPEG 640x480 multipart / JPEG limit", model="resnet18",
           row="jpeg640_16_requests", ref="jpeg_limit_640x480", goal=0.85),
    Target(id="resnet18_jpeg1080", label="resnet18 16 JPEG 1920x1080 multipart / JPEG limit", model="resnet18",
           row="jpeg1080_16_requests", ref="jpeg_limit_1920x1080", goal=0.85),
    Target(id="decode_1080_pool", label="decode 1920x1080: all cores / 1 thread", model="decode",
           row="decode_1920x1080_all", ref="decode_1920x1080_1", goal=1.7),
]
OWN_WORK_CEILING = 3.0  # resnet18: the handler's own work, % of the forward pass (at most)


def multipart(files: tuple) -> tuple[bytes, str]:
    """One multipart/form-data body, a part per image (distinct names: TorchServe keys parts by name)."""
    import urllib3

    fields = [(f"img{i}", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(files)]
    return urllib3.encode_multipart_formdata(fields)


def make_payloads(auth: dict, quick: bool) -> dict[str, Payload]:
    """Every payload the cases send, by id (the --quick run makes only the small ones)."""
    rng = np.random.default_rng(0)
    u8_1 = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    u8_32 = rng.integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    npy_hdr = {**auth, "Content-Type": NPY, "Accept": NPY}
    payloads = {
        "u8_1": Payload(npy_bytes(u8_1), npy_hdr, 1, u8_1[None]),
        "u8_32": Payload(npy_bytes(u8_32), npy_hdr, 32, u8_32),
        "u8_32_json_resp": Payload(npy_bytes(u8_32), {**auth, "Content-Type": NPY}, 32, u8_32),
    }
    photos = {"jpeg640_16": jpegs(16, 640, 480, 1)}
    if not quick:
        f32_32 = u8_32.astype(np.float32) / 255
        payloads["f32_32"] = Payload(npy_bytes(f32_32), npy_hdr, 32, f32_32)
        json_body = json.dumps({"data": u8_32.tolist()}, separators=(",", ":")).encode()
        payloads["json_u8_32"] = Payload(json_body, {**auth, "Content-Type": "application/json", "Accept": NPY},
                                         32, u8_32.astype(np.float32))
        photos["jpeg1080_16"] = jpegs(16, 1920, 1080, 2)
    for name, files in photos.items():
        body, content_type = multipart(files)
        payloads[name] = Payload(body, {**auth, "Content-Type": content_type, "Accept": NPY}, len(files), jpegs=files)
    if "jpeg1080_16" in photos:
        one = photos["jpeg1080_16"][0]
        payloads["jpeg1080_1"] = Payload(one, {**auth, "Content-Type": "image/jpeg", "Accept": NPY}, 1, jpegs=(one,))
    return payloads


def select_cases(payloads: dict[str, Payload], quick: bool, only_payloads: Optional[str] = None) -> list[Case]:
    """The cases whose payload was made, the --quick ones on a quick run, and only --payloads when given."""
    cases = [c for c in CASES if c.payload in payloads and (c.quick or not quick)]
    if only_payloads:
        cases = [c for c in cases if c.payload in only_payloads.split(",")]
    return cases
