"""In process: the JPEG decode paths (exact, crop-window resize, libjpeg draft) on 16 photos of
1920x1080, resize 256 and crop 224: images/s on one thread and on the worker's pool (medians of
interleaved rounds), and each fast path's smallest embedding cosine against the exact path
(ResNet-18-shaped, layer4; docs/performance.md#encoded-images)."""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from image_embedder.image_decoding import ImageDecoder, default_decode_threads
from image_embedder_testkit.compare import cosine_min

from .framework import make_engines, payload
from .limits import timed

PATHS = {"exact": {}, "crop-window resize": {"exact_resize": False},
         "draft": {"jpeg_draft": True, "exact_resize": False}}

ABOUT = "in process: the JPEG decode paths' speed and embedding cosine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, work: str) -> dict:
    files = payload("jpeg640_16" if args.quick else "jpeg1080_16").images
    rows = [{f"img{i}": bytearray(f) for i, f in enumerate(files)}]
    threads = sorted({1, default_decode_threads()})
    timings: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for path, options in PATHS.items():
            for n in threads:
                decoder = ImageDecoder("RGB", 256, 224, threads=n, **options)

                def decode_all(decoder=decoder) -> list:
                    decoder.prefetch(rows)
                    return [decoder(v) for v in rows[0].values()]

                decode_all()  # warm-up
                timings.setdefault((path, n), []).append(len(files) / timed(decode_all, 1).wall_s)
    engine = make_engines(work, ["resnet18"])["resnet18"]
    encoder = engine.encoder(len(threads))
    embedded = {path: encoder.embed_requests([[ImageDecoder("RGB", 256, 224, **o).decode(f) for f in files]])[0]
                for path, o in PATHS.items()}
    exact = embedded["exact"]
    centre = exact.mean(0)  # random-weight features share a large common part: cosine also without it
    print(f"\n{len(files)} JPEGs, medians of {args.rounds} round(s): images/s by decode threads; min cosine vs exact")
    out = []
    for path in PATHS:
        rates = {n: statistics.median(timings[path, n]) for n in threads}
        cosine = cosine_min(embedded[path], exact)
        centred = cosine_min(embedded[path] - centre, exact - centre)
        out.append({"path": path, "images_per_s": rates, "min_cosine": cosine, "min_cosine_centred": centred})
        print(f"  {path:20} " + "  ".join(f"{n} thread(s) {r:7.1f}" for n, r in rates.items())
              + f"   cosine {cosine:.7f} (centred {centred:.7f})")
    return {"rows": out, "errors": [] if np.isfinite(exact).all() else ["non-finite embeddings"]}
