"""docs/gpu.md agrees with the files it points to (its GPU commands need a GPU and are not run here)."""
from __future__ import annotations

import os
import re

import yaml

from image_embedder_testkit.checkout import REPO


def _read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def test_gpu_page_matches_the_model_config_the_configmap_and_the_deployment():
    page = _read("docs/gpu.md")
    config = yaml.safe_load(_read("examples/model-config-gpu.yaml"))
    assert f"| `batchSize` / `maxBatchDelay` | {config['batchSize']} / {config['maxBatchDelay']} ms" in page
    assert "--config-file examples/model-config-gpu.yaml" in page and "--batch-size 32" in page
    [workers] = set(re.findall(r"default_workers_per_model=(\d+)", page))
    assert f"default_workers_per_model={workers}" in _read("deploy/k8s/configmap.yaml")
    assert 'nvidia.com/gpu: "1"' in page and 'nvidia.com/gpu: "1"' in _read("deploy/k8s/deployment-gpu.yaml")
    assert "](docs/gpu.md)" in _read("README.md")  # the README links the page
    for path in re.findall(r"`((?:deploy|scripts|examples)/[\w./-]+)`", page):
        assert os.path.exists(os.path.join(REPO, path)), path
