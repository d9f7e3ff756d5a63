"""One real TorchServe shared by the image, pooling-option, channels-last, metrics and KServe v2 tests.

Models it serves (all built from small models so the suite stays fast):
- `images`: the example's conv1, with resize 256 / center_crop 224 / scale 1/255 / mean / std.
- `multi`: the example, layers [conv2, conv1] (given order, not run order), gem (p=2.5), normalize.
- `chlast`: a model whose tapped layer is channels-last (N, H, W, D), channel_axis -1.
"""
from __future__ import annotations

import os
import textwrap

import torch
import yaml

from image_embedder_tools.build import ArchiveSpec, build_archive
from image_embedder_testkit.imagenet import IMAGENET
from image_embedder_testkit.ts_server import TorchServe

IMAGE_SETTINGS = {
    "resize": 256,
    "center_crop": 224,
    **IMAGENET,
}
MULTI_LAYERS = ["conv2", "conv1"]
MULTI_SETTINGS = {"pooling": "gem", "gem_p": 2.5, "normalize": True}
TS_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 50, "responseTimeout": 120}

CHANNELS_LAST_MODEL = textwrap.dedent('''
    """A model whose features are channels-last: conv, then NCHW -> NHWC, then a per-pixel Linear."""
    import torch
    import torch.nn as nn


    class ToNHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)


    class ChannelsLast(nn.Module):
        def __init__(self, width=6):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3)
            self.to_nhwc = ToNHWC()
            self.proj = nn.Linear(width, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            x = self.proj(self.to_nhwc(torch.relu(self.conv(x))))
            return self.head(x.mean(dim=(1, 2)))
''')


def write_channels_last_model(folder: str) -> dict:
    """The channels-last model file and its seeded weights."""
    model_file = os.path.join(folder, "chlast_model.py")
    with open(model_file, "w") as f:
        f.write(CHANNELS_LAST_MODEL)
    namespace: dict = {}
    exec(compile(CHANNELS_LAST_MODEL, model_file, "exec"), namespace)
    torch.manual_seed(1)
    weights = os.path.join(folder, "chlast_weights.pth")
    torch.save(namespace["ChannelsLast"](width=6).state_dict(), weights)
    return {"model_file": model_file, "state_dict": weights, "class": "ChannelsLast", "kwargs": {"width": 6}}


def build_feature_archives(example_files: dict, store: str) -> dict:
    """Build the three archives into `store`; returns the channels-last model's files for references."""
    config = os.path.join(store, "ts-config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(TS_CONFIG, f)
    common = dict(config_file=config, export_path=store)
    build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"], "conv1",
                  input_shape=[3, 224, 224], name="images", settings=IMAGE_SETTINGS, **common), quiet=True)
    build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                  ",".join(MULTI_LAYERS), input_shape=[3, 64, 64], name="multi", settings=MULTI_SETTINGS, **common), quiet=True)
    chlast = write_channels_last_model(store)
    build_archive(ArchiveSpec(chlast["model_file"], chlast["class"], chlast["state_dict"], "proj", model_kwargs=chlast["kwargs"],
                  input_shape=[3, 32, 32], name="chlast", settings={"channel_axis": -1}, **common), quiet=True)
    return chlast


def start_feature_server(example_files: dict, store: str) -> TorchServe:
    """A started TorchServe serving images, multi and chlast, with its `chlast` files attached."""
    chlast = build_feature_archives(example_files, store)
    server = TorchServe(store, "images=images.mar,multi=multi.mar,chlast=chlast.mar")  # shipped config.properties
    server.chlast = chlast  # type: ignore[attr-defined]
    return server.serve("images", "multi", "chlast", timeout=240)
