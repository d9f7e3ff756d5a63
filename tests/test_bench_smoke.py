"""The benchmark runs end to end (`bench.py --quick`) and prints its ratios; nothing about speed is asserted.

A benchmark is not a timed test: this only proves the script still works against the real
TorchServe (archives build, the no-op floor and our archives answer .npy and multipart JPEG from
both client kinds, answers match in-process embeddings, limit/raw/decode rows and the report and
its JSON are written) and that it cleans up after itself.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_server import java_available

pytestmark = pytest.mark.server


def test_bench_quick_runs_and_reports_ratios(tmp_path):
    if not java_available():
        pytest.fail("the benchmark needs Java 17 for TorchServe")
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--quick", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=420, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # every served row carries a ratio to its limit row (and the .npy ones to a raw row) of the same run
    served = [line for line in out.splitlines() if re.match(r"^example\s+served\s", line)]
    assert len(served) >= 6, out
    assert all(re.search(r"\d+\.\d\dx (jpeg )?limit ", line) for line in served), served
    assert re.search(r"^floor\s+floor\s", out, re.M), out
    assert re.search(r"^example\s+raw\s+full forward b32 .* \d+\.\d\dx raw b32", out, re.M), out
    assert re.search(r"^decode\s+decode\s+decode 640x480, 1 thread", out, re.M), out
    results = json.loads(out_json.read_text())
    assert not results["errors"], results["errors"]
    assert {r["kind"] for r in results["rows"]} >= {"limit", "raw", "floor", "served", "decode"}
    served_rows = [r for r in results["rows"] if r["kind"] == "served"]
    assert {r["name"] for r in served_rows} >= {"b32 uint8 .npy, requests", "b32 uint8 .npy, requests, 2 in flight",
                                                "16 JPEG 640x480 multipart, requests"}
    assert all(any(k.startswith(("limit", "jpeg limit")) and v > 0 for k, v in r["ratios"].items())
               for r in served_rows), served_rows
    assert all(len(r["spread"]) == 2 and r["spread"][0] <= r["images_per_s"] <= r["spread"][1] for r in results["rows"])
    assert results["load_before"] and results["load_after"]
    # served embeddings equal the in-process ones for the same payload (.npy and JPEG alike)
    assert results["checks"] and all(v is not None and v <= 1e-5 for v in results["checks"].values()), results["checks"]
    assert results["breakdown"]["example"]["zero_copy_npy"] == 1.0
    # the bench's own TorchServe is gone (its temporary directories are removed)
    assert not [d for d in os.listdir(tmp_path) if d.startswith(("bench-", "ts-test-"))]
