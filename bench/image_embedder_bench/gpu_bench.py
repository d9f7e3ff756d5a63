"""A short in-process GPU benchmark of the engine (what a served worker does, minus TorchServe).

    python3 scripts/gpu_bench.py --json out/gpu_bench.json

ResNet-18- and ResNet-50-shaped models (bench_models.py, layer4, avg pooling, ImageNet scale/mean/std),
batch 1 and 32, float32 and float16/bfloat16 autocast, from uint8 .npy arrays (pinned host memory,
uint8 over PCIe, normalized on the device) and from 1920x1080 JPEGs (decoded by the worker's thread
pool, resize 256, crop 224). Each row: images/s (best of a few timed calls after warm-up) and, for
autocast, the smallest embedding cosine against float32. Runs in about a minute on one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from image_embedder.encoder import ImageEncoder
from image_embedder.image_decoding import ImageDecoder, default_decode_threads
from image_embedder.settings import EncoderSettings
from image_embedder_bench import bench_models
from image_embedder_bench.bench_photos import jpegs
from image_embedder_bench.json_out import write_json
from image_embedder_testkit.compare import cosine_min
from image_embedder_testkit.imagenet import IMAGENET



def encoder(folder: str, model: str, dtype: str, device: str) -> ImageEncoder:
    weights = os.path.join(folder, f"{model}.pth")
    if not os.path.exists(weights):
        bench_models.make_weights(weights, model_class=getattr(bench_models, model))
    settings = EncoderSettings.from_mapping({
        "model_definition_file": "bench_models.py", "model_class_name": model, "model_state_dict_path": f"{model}.pth",
        "layer_name": "layer4", "dtype": dtype, "device": device, "default_batch_size": 32, **IMAGENET})
    return ImageEncoder(settings, folder)


def best_rate(fn, images: int, calls: int = 5) -> float:
    fn()  # warm-up (cudnn autotune, allocator)
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()  # returns numpy: the device work is finished when it returns
        times.append(time.perf_counter() - t)
    return images / min(times)


def model_rows(folder: str, model: str, device: str, u8: dict, files: list) -> list[dict]:
    """`model` in float32 and the device's low precision: uint8 .npy batches (with the low precision's
    smallest cosine against float32) and a batch of JPEGs decoded by the worker's thread pool."""
    low = "bfloat16" if device == "cpu" else "float16"
    decoder = ImageDecoder("RGB", 256, 224, threads=default_decode_threads())
    rows, base = [], None
    for dtype in ("float32", low):
        enc = encoder(folder, model, dtype, device)
        for batch in (1, 32):
            rate = best_rate(lambda: enc.embed_requests([[u8[batch]]])[0], batch)
            row = {"model": model, "dtype": dtype, "input": f"uint8 .npy b{batch}", "images_per_s": rate}
            if batch == 32:
                got = enc.embed_requests([[u8[32]]])[0]
                base = got if dtype == "float32" else base
                if dtype != "float32":
                    row["min_cosine_vs_float32"] = cosine_min(got, base)
            rows.append(_shown(row))

        def jpeg_batch():
            rows_in = [{f"img{i}": bytearray(f) for i, f in enumerate(files)}]
            decoder.prefetch(rows_in)
            return enc.embed_requests([[decoder(v)[0] for v in rows_in[0].values()]])[0]

        rows.append(_shown({"model": model, "dtype": dtype, "input": "32 JPEG 1920x1080 (decode+forward)",
                            "images_per_s": best_rate(jpeg_batch, 32, 3)}))
    return rows


def decode_rows(files: list) -> list[dict]:
    """The JPEGs decoded alone, on one thread and on the worker's default thread count."""
    rows = []
    for threads in sorted({1, default_decode_threads()}):
        alone = ImageDecoder("RGB", 256, 224, threads=threads)

        def decode_all(alone=alone):
            rows_in = [{f"img{i}": bytearray(f) for i, f in enumerate(files)}]
            alone.prefetch(rows_in)
            return [alone(v) for v in rows_in[0].values()]

        rows.append(_shown({"input": "32 JPEG 1920x1080, decode alone", "threads": threads,
                            "images_per_s": best_rate(decode_all, 32, 3)}))
    return rows


def _shown(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="ResNet18,ResNet50")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="gpu-bench-")
    os.symlink(bench_models.__file__, os.path.join(folder, "bench_models.py"))
    rng = np.random.default_rng(0)
    u8 = {b: rng.integers(0, 256, (b, 3, 224, 224), dtype=np.uint8) for b in (1, 32)}
    files = list(jpegs(32, 1920, 1080, 3))
    rows = [row for model in args.models.split(",") for row in model_rows(folder, model, args.device, u8, files)]
    rows += decode_rows(files)
    result = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "rows": rows}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
