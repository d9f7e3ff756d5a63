"""In process: the engine's speed options (channels_last, bfloat16, compile, early exit off) against
float32 eager on a b32 uint8 batch: images/s (median of rounds, best pass size), the first call's
seconds, and the embeddings' largest difference and smallest cosine against float32 eager."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from image_embedder_testkit.compare import cosine_min

from .framework import cores, make_engines, payload
from .limits import timed

OPTIONS = {"float32 eager": {}, "channels_last": {"channels_last": True}, "dtype bfloat16": {"dtype": "bfloat16"},
           "compile": {"compile": True}, "early_exit off": {"early_exit": False}}

ABOUT = "in process: channels_last, bfloat16, compile, early exit off: speed and accuracy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, work: str) -> dict:
    images = payload("u8_32").images[:8 if args.quick else 32]
    out, errors = [], []
    for model, engine in make_engines(work, args.models).items():
        base = None
        for label, extra in OPTIONS.items():
            try:
                t = time.perf_counter()
                encoder, work_fn = engine.work(cores(), images, **extra)
                got = work_fn()
                first = time.perf_counter() - t
                rate = statistics.median(len(images) / timed(work_fn, 1).wall_s for _ in range(args.rounds))
            except Exception as exc:  # an option this model or machine can't use is reported, not fatal
                out.append({"model": model, "option": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"  {model:9} {label:16} not usable: {out[-1]['error'][:150]}")
                continue
            base = got if base is None else base
            out.append({"model": model, "option": label, "images_per_s": rate, "first_call_s": first,
                        "max_abs": float(np.abs(got - base).max()), "min_cosine": cosine_min(got, base)})
            print(f"  {model:9} {label:16} {rate:8.1f} img/s  first call {first:6.1f}s  max abs "
                  f"{out[-1]['max_abs']:.2e}  min cosine {out[-1]['min_cosine']:.7f}")
            if label == "float32 eager" and not np.isfinite(got).all():
                errors.append(f"{model}: non-finite embeddings")
    return {"rows": out, "errors": errors}
