"""Lay out KServe's TorchServe storage folder from a built archive: config/ + model-store/.

KServe's `kserve-torchserve` runtime downloads the InferenceService's `storageUri` to /mnt/models and
runs `torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties`; its wrapper (same container) answers on 8080 and
forwards every v1/v2 request, without a token, to TorchServe's `/predictions/<model>` on the
config's inference address. So the config written here:

- binds TorchServe's inference and management APIs to loopback (8085): only the wrapper reaches them,
  which is why token authorization is off there; metrics (no token) on 0.0.0.0:8082 for Prometheus;
- names the model in `model_snapshot`: TorchServe loads it at start (the command has no --models),
  and the wrapper takes its model names from there;
- sets `enable_envvars_config=true` (KServe sets TS_SERVICE_ENVELOPE from the serviceEnvelope label;
  leave that label unset: our handler speaks KServe v1 and v2 itself, per request, which keeps
  batching safe; TorchServe's envelopes answer only the first request of a batch).

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
from typing import Optional

import yaml

INFERENCE_ADDRESS = "http://127.0.0.1:8085"
METRICS_ADDRESS = "http://0.0.0.0:8082"
CONFIG_TEMPLATE = """\
# Written by scripts/kserve_layout.py for KServe's kserve-torchserve runtime.
# KServe's wrapper in the same container forwards every request to TorchServe on {inference}
# without a token: TorchServe's APIs stay on loopback, token authorization is off there.
inference_address={inference}
management_address={inference}
metrics_address={metrics}
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
grpc_inference_port=7070
grpc_management_port=7071
disable_token_authorization=true
enable_model_api=false
# KServe sets TS_SERVICE_ENVELOPE from the serviceEnvelope label: leave the label unset.
enable_envvars_config=true
install_py_dep_per_model=false
model_store=/mnt/models/model-store
max_request_size=134217728
max_response_size=134217728
metrics_mode=prometheus
model_metrics_auto_detect=true
model_snapshot={snapshot}
"""


@dataclass
class ServingSettings:
    """What TorchServe needs to register the model at start (model_snapshot)."""

    name: str
    version: str
    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 8
    max_batch_delay: int = 50
    response_timeout: int = 120

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
    """Write `<out_dir>/config/config.properties` and `<out_dir>/model-store/<name>.mar`; returns the config path."""
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
    with open(config_path, "w") as f:
        f.write(CONFIG_TEMPLATE.format(inference=INFERENCE_ADDRESS, metrics=METRICS_ADDRESS,
                                       snapshot=settings.snapshot(mar_name)))
    return config_path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mar", help="the built archive, e.g. model_store/encoder.mar")
    parser.add_argument("out_dir", help="the folder to upload as the InferenceService's storageUri")
    parser.add_argument("--workers", type=int, help="workers per pod (default: the archive's minWorkers)")
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
