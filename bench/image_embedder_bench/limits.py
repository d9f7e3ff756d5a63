"""What serving could reach if serving cost nothing: the engine in process, on exactly the worker's work.

Two limits, both from the best pass size of 8/16/32:
- `single stream`: one process with every thread doing one request after another (what a user's own
  loop gets): the bar for one sequential client;
- `best layout`: the better of that and one single-thread process per core side by side (summed):
  the bar for concurrent clients, whatever layout the server picks.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from image_embedder.encoder import ImageEncoder
from image_embedder.errors import RequestError
from image_embedder.image_decoding import ImageDecoder
from image_embedder.settings import EncoderSettings

PASS_SIZES = (8, 16, 32)


@dataclass(frozen=True)
class Engine:
    """The model and settings an archive serves, rebuilt in any process (the team's too)."""

    model_file: str
    model_class: str
    state_dict: str
    layer: str
    settings: tuple = ()  # (key, value) pairs

    def encoder(self, threads: int) -> ImageEncoder:
        torch.set_num_threads(threads)
        settings = EncoderSettings.from_mapping({
            "model_definition_file": os.path.basename(self.model_file), "model_class_name": self.model_class,
            "model_state_dict_path": os.path.basename(self.state_dict), "layer_name": self.layer,
            "num_threads": threads, **dict(self.settings)})
        return ImageEncoder(settings, os.path.dirname(self.model_file))

    def work(self, threads: int, images: np.ndarray | tuple) -> tuple[ImageEncoder, Callable[[], np.ndarray]]:
        """One request's work as the worker does it: a uint8 batch, or encoded images decoded by a pool
        of `threads` threads, then prepare + forward (early exit) + pooling. Returns its embeddings;
        a refusal raises (a limit must never time an error)."""
        encoder = self.encoder(threads)
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


def best_pass(encoder: ImageEncoder, work: Callable[[], object], count: int, calls: int) -> float:
    """Images/s of the fastest pass size (among those up to the request's image count)."""
    best = 0.0
    for size in [p for p in PASS_SIZES if p <= count] or [count]:
        encoder.pass_size = size
        work()  # warm-up at this size
        start = time.perf_counter()
        for _ in range(calls):
            work()
        best = max(best, count * calls / (time.perf_counter() - start))
    return best


def single_stream(engine: Engine, images: np.ndarray | tuple, calls: int) -> float:
    """Images/s of this process with every thread, one request after another."""
    threads = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        encoder, work = engine.work(threads, images)
        return best_pass(encoder, work, len(images), calls)
    finally:
        torch.set_num_threads(before)


def _team_member(engine: Engine, images: np.ndarray | tuple, calls: int, start, out) -> None:
    encoder, work = engine.work(1, images)
    sizes = {}
    for size in [p for p in PASS_SIZES if p <= len(images)] or [len(images)]:  # pick this process's best size
        encoder.pass_size = size
        work()
        t = time.perf_counter()
        work()
        sizes[size] = time.perf_counter() - t
    encoder.pass_size = min(sizes, key=sizes.get)
    start.wait()  # all members start together: the rates are side by side, not one after another
    t = time.perf_counter()
    for _ in range(calls):
        work()
    out.put(len(images) * calls / (time.perf_counter() - t))


def single_thread_team(engine: Engine, images: np.ndarray | tuple, calls: int) -> float:
    """Summed images/s of one single-thread process per core, side by side."""
    cores = len(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_team_member, args=(engine, images, calls, start, out), daemon=True)
             for _ in range(cores)]
    for p in procs:
        p.start()
    try:
        return sum(out.get(timeout=1800) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
