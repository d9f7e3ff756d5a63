"""The example model as the bench, the load test and the soak serve it: its weights from its own
`__main__` (seeded), then an archive of it at `conv1`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Optional

import yaml

from .checkout import EXAMPLE_MODEL, RESNET_MODEL


def example_files(folder: str) -> tuple[str, str]:
    """A copy of examples/custom_model/model.py in `folder` and the state_dict its __main__ writes."""
    os.makedirs(folder, exist_ok=True)
    model_file = shutil.copy(EXAMPLE_MODEL, folder)
    weights = os.path.join(folder, "model_state_dict.pth")
    subprocess.run([sys.executable, model_file, weights], check=True, capture_output=True)
    return model_file, weights


def resnet_files(folder: str, model_class: str = "ResNet18") -> tuple[str, str]:
    """A copy of examples/resnet/model.py in `folder` and seeded random weights of `model_class` beside it."""
    os.makedirs(folder, exist_ok=True)
    model_file = shutil.copy(RESNET_MODEL, folder)
    weights = os.path.join(folder, f"{model_class}.pth")
    subprocess.run([sys.executable, model_file, weights, model_class], check=True, capture_output=True)
    return model_file, weights


def build_example(store: str, name: str = "encoder", settings: Optional[dict] = None,
                  batching: Optional[dict] = None, files: Optional[tuple[str, str]] = None) -> str:
    """The example at conv1 built into `store` as NAME.mar, with handler `settings` and TorchServe
    `batching` (batchSize, maxBatchDelay, ...; none: the build's defaults), from `files` (example_files'
    model file and weights; made in the store when not given). Returns the archive's path."""
    from image_embedder_tools.build import ArchiveSpec, build_archive

    folder = os.path.join(store, f".{name}-files")
    model_file, weights = files or example_files(folder)
    config = None
    if batching:
        os.makedirs(folder, exist_ok=True)
        config = os.path.join(folder, "model-config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(batching, f)
    return build_archive(ArchiveSpec(model_file, "CustomModel", weights, "conv1", input_shape=[3, 224, 224],
                                     name=name, export_path=store, config_file=config, settings=settings or {}),
                         quiet=True)
