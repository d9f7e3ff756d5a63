"""In process, on a GPU (or --device cpu): ResNet-18- and ResNet-50-shaped models (layer4, ImageNet
preprocessing), batch 1 and 32 of uint8 .npy (pinned host memory, uint8 over PCIe, normalized on the
device) and 32 JPEGs of 1920x1080 (the worker's decode pool, resize 256, crop 224), float32 and the
device's low precision (float16 on CUDA, bfloat16 on CPU, with its smallest cosine against float32);
best of a few timed calls after warm-up. About a minute on one GPU (scripts/gpu_check.sh)."""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from image_embedder_testkit.compare import cosine_min

from image_embedder_testkit.example_build import resnet_files

from .framework import Engine, payload
from .limits import timed

ABOUT = "in process on a GPU: ResNet-18/50, float32 and float16, .npy and JPEG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-models", default="ResNet18,ResNet50", help="examples/resnet classes")


def best_rate(fn, images: int, calls: int = 5) -> float:
    fn()  # warm-up (cudnn autotune, allocator)
    fn()
    return images / min(timed(fn, 1).wall_s for _ in range(calls))  # fn returns numpy: the device is done


def run(args: argparse.Namespace, work: str) -> dict:
    u8 = {b: payload("u8_32").images[:b] for b in (1, 32)}
    files = payload("jpeg1080_16").images * 2
    low = "bfloat16" if args.device == "cpu" else "float16"
    rows = []
    for model in args.gpu_models.split(","):
        model_file, weights = resnet_files(work, model)
        engine = Engine(model, model_file, model, weights, "layer4")
        base = None
        for dtype in ("float32", low):
            extra = {"dtype": dtype, "device": args.device, "default_batch_size": 32}
            for batch in (1, 32):
                _, work_fn = engine.work(os.cpu_count() or 1, u8[batch], **extra)
                row = {"model": model, "dtype": dtype, "input": f"uint8 .npy b{batch}",
                       "images_per_s": best_rate(work_fn, batch)}
                if batch == 32:
                    got = work_fn()
                    base = got if dtype == "float32" else base
                    row["min_cosine_vs_float32"] = cosine_min(got, base)
                rows.append(row)
            _, jpeg_fn = engine.work(os.cpu_count() or 1, files, **extra)
            rows.append({"model": model, "dtype": dtype, "input": "32 JPEG 1920x1080 (decode+forward)",
                         "images_per_s": best_rate(jpeg_fn, len(files), 3)})
    for row in rows:
        print("  " + "  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    ok = all(np.isfinite(r["images_per_s"]) for r in rows)
    return {"device": device, "torch": torch.__version__, "rows": rows, "errors": [] if ok else ["no rate"]}
