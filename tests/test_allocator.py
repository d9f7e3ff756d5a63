"""The worker's malloc settings: freed request buffers are reused (no page faults per request)."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Optional

import pytest

from image_embedder.allocator import THRESHOLD_VARIABLES, reuse_freed_memory
from image_embedder_testkit.example_build import resnet_files
from image_embedder_tools.build import ArchiveSpec, build_archive

# A worker as TorchServe runs it (TsModelLoader, Service.predict) in a process of its own, answering
# batch-32 uint8 .npy requests; prints the minor page faults of each call after three to warm up.
# The median is the steady state: a call now and then grows a lazily allocated pool once.
FAULTS = r"""
import resource, sys
import numpy as np
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
model = InProcessModel(sys.argv[1])
body = npy_bytes(np.random.default_rng(0).integers(0, 256, (32, 3, 224, 224), dtype=np.uint8))
for call in range(13):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    [answer] = model.predict([Request(body, headers={"Accept": "application/x-npy"})])
    assert answer.status == 200, answer.body[:300]
    if call >= 3:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_per_request(archive: str, thresholds: Optional[dict] = None) -> list[int]:
    """The page faults of each b32 call after the warm-up, in a worker of `archive` of its own, with
    `thresholds` (MALLOC_*_THRESHOLD_) in its environment."""
    env = {**{k: v for k, v in os.environ.items() if k not in THRESHOLD_VARIABLES}, **(thresholds or {})}
    out = subprocess.run([sys.executable, "-c", FAULTS, archive], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(line) for line in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_worker_reuses_its_pages_from_request_to_request(example_archive):
    """Every batch-32 request faults in its ~30 MB of buffers anew unless the worker keeps them: with
    the setting (the default) the steady state takes next to no page faults; with glibc's starting
    thresholds held fixed (without the setting they only grow, and how far varies from run to run)
    thousands, a 4 KiB page each: the float32 batch alone is 4 704 pages."""
    kept = _faults_per_request(example_archive)
    not_kept = _faults_per_request(example_archive, {name: str(128 * 1024) for name in THRESHOLD_VARIABLES})
    assert statistics.median(kept) <= 64, kept
    assert statistics.median(not_kept) >= 4704, not_kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_model_that_frees_much_at_once_keeps_its_pages_too(tmp_path):
    """ResNet-18's passes of 8 images free more than 64 MiB at the top of the heap at once: a trim
    threshold of twice the mmap threshold still handed it back after every request (17 000-56 000 faults)."""
    model_file, weights = resnet_files(str(tmp_path / "files"))
    mar = build_archive(ArchiveSpec(model_file, "ResNet18", weights, "layer4", input_shape=[3, 224, 224],
                                    name="resnet", export_path=str(tmp_path)), quiet=True)
    faults = _faults_per_request(mar)
    assert statistics.median(faults) <= 64, faults


def test_the_environment_wins_over_the_thresholds(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert reuse_freed_memory(True) == "malloc thresholds: MALLOC_TRIM_THRESHOLD_=1000 from the environment"


def test_disabled_leaves_glibc_alone(monkeypatch):
    for name in THRESHOLD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert reuse_freed_memory(False) is None
