"""Lay out KServe's TorchServe storage folder from a built archive: config/ + model-store/.

KServe's `kserve-torchserve` runtime downloads the InferenceService's `storageUri` to /mnt/models and
starts TorchServe with `--model-store=/mnt/models/model-store` and
`--ts-config=/mnt/models/config/config.properties`; its wrapper (same container) answers on 8080 and
forwards every v1/v2 request, without a token, to TorchServe's `/predictions/<model>` on the
config's inference address. The config is this package's kserve/config.properties (why each line: there)
plus a `model_snapshot` naming the model: TorchServe loads it at start (the runtime passes no
--models), and the wrapper takes its model names from there. Leave the InferenceService's
serviceEnvelope label unset: our handler speaks KServe v1 and v2 itself, per request, which keeps
batching safe; TorchServe's envelopes answer only the first request of a batch.

Batch size, delay and workers come from the archive's model-config.yaml unless given here.

    .venv/bin/python scripts/kserve_layout.py model_store/encoder.mar out/kserve
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import yaml

from image_embedder_tools.ts_defaults import DEFAULT_TS_CONFIG

# package data, so an installed wheel finds it from any directory
CONFIG_TEMPLATE = resources.files("image_embedder_tools") / "kserve" / "config.properties"
LOG_CONFIG = resources.files("image_embedder_tools") / "log4j2.xml"  # the template's vmargs names its copy


@dataclass
class ServingSettings:
    """What TorchServe needs to register the model at start (model_snapshot)."""

    name: str
    version: str
    # One worker per CPU of deploy/kserve's CPU InferenceService (2), sharing its CPUs among those
    # computing (docs/performance.md#worker-layout). A model_snapshot must name a count.
    min_workers: int = 2
    max_workers: int = 2
    batch_size: int = DEFAULT_TS_CONFIG["batchSize"]
    max_batch_delay: int = DEFAULT_TS_CONFIG["maxBatchDelay"]
    response_timeout: int = DEFAULT_TS_CONFIG["responseTimeout"]

    def snapshot(self, mar_name: str) -> str:
        model = {"defaultVersion": True, "marName": mar_name, "minWorkers": self.min_workers,
                 "maxWorkers": self.max_workers, "batchSize": self.batch_size,
                 "maxBatchDelay": self.max_batch_delay, "responseTimeout": self.response_timeout}
        return json.dumps({"name": "startup.cfg", "modelCount": 1,
                           "models": {self.name: {self.version: model}}}, separators=(",", ":"))


def read_archive(mar: str) -> ServingSettings:
    """The model name and version from MANIFEST.json, the worker/batch settings from model-config.yaml."""
    try:
        with zipfile.ZipFile(mar) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            config_name = manifest["model"].get("configFile")
            config = yaml.safe_load(archive.read(config_name)) if config_name else {}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ValueError(f"{mar!r} is not a TorchServe archive with MAR-INF/MANIFEST.json ({e}); "
                         "build one with scripts/build_mar.py") from e
    model = manifest["model"]
    settings = ServingSettings(model["modelName"], model.get("modelVersion") or "1.0")
    for field, key in (("min_workers", "minWorkers"), ("max_workers", "maxWorkers"), ("batch_size", "batchSize"),
                       ("max_batch_delay", "maxBatchDelay"), ("response_timeout", "responseTimeout")):
        if isinstance((config or {}).get(key), int):
            setattr(settings, field, config[key])
    return settings


def write_layout(mar: str, out_dir: str, workers: Optional[int] = None, batch_size: Optional[int] = None,
                 max_batch_delay: Optional[int] = None) -> str:
    """Write `<out_dir>/config/config.properties`, `<out_dir>/config/log4j2.xml` and
    `<out_dir>/model-store/<name>.mar`; returns the config path."""
    settings = read_archive(mar)
    if workers is not None:
        settings.min_workers = settings.max_workers = workers
    if batch_size is not None:
        settings.batch_size = batch_size
    if max_batch_delay is not None:
        settings.max_batch_delay = max_batch_delay
    mar_name = f"{settings.name}.mar"
    os.makedirs(os.path.join(out_dir, "config"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "model-store"), exist_ok=True)
    target = os.path.join(out_dir, "model-store", mar_name)
    if os.path.abspath(mar) != os.path.abspath(target):
        shutil.copyfile(mar, target)
    config_path = os.path.join(out_dir, "config", "config.properties")
    config = CONFIG_TEMPLATE.read_text()
    with open(config_path, "w") as f:
        f.write(config.rstrip("\n") + f"\nmodel_snapshot={settings.snapshot(mar_name)}\n")
    with open(os.path.join(out_dir, "config", "log4j2.xml"), "w") as f:
        f.write(LOG_CONFIG.read_text())
    return config_path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mar", help="the built archive, e.g. model_store/encoder.mar")
    parser.add_argument("out_dir", help="the folder to upload as the InferenceService's storageUri")
    parser.add_argument("--workers", type=int, help="workers per pod (default: the archive's minWorkers, else 2: one per CPU of the CPU InferenceService)")
    parser.add_argument("--batch-size", type=int, help="TorchServe batch size (default: the archive's batchSize)")
    parser.add_argument("--max-batch-delay", type=int, help="ms to wait for a batch (default: the archive's)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.mar):
        parser.error(f"archive {args.mar!r} does not exist; build it with scripts/build_mar.py")
    try:
        config = write_layout(args.mar, args.out_dir, args.workers, args.batch_size, args.max_batch_delay)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {config} and {os.path.join(args.out_dir, 'model-store')}/: upload {args.out_dir}/ "
          "and point the InferenceService's storageUri at it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
