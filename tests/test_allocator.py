"""The worker's malloc settings: freed request buffers are reused (no page faults per request)."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest

from image_embedder.allocator import THRESHOLD_VARIABLES, reuse_freed_memory
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


def _faults_per_request(archive: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in THRESHOLD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", FAULTS, archive], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(line) for line in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_worker_reuses_its_pages_from_request_to_request(example_files, example_archive, tmp_path):
    """Every batch-32 request faults in its ~30 MB of buffers anew unless the worker keeps them: with
    the setting (the default) the steady state takes next to no page faults, without it thousands (a
    4 KiB page each: the float32 batch alone is 4 704 pages)."""
    without = build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                                        "conv1", input_shape=[3, 224, 224], name="without", export_path=str(tmp_path),
                                        settings={"reuse_freed_memory": False}), quiet=True)
    kept, not_kept = _faults_per_request(example_archive), _faults_per_request(without)
    assert statistics.median(kept) <= 64, kept
    assert statistics.median(not_kept) >= 4704, not_kept


def test_the_environment_wins_over_the_thresholds(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert reuse_freed_memory(True) == "malloc thresholds: MALLOC_TRIM_THRESHOLD_=1000 from the environment"


def test_disabled_leaves_glibc_alone(monkeypatch):
    for name in THRESHOLD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert reuse_freed_memory(False) is None
