"""The benchmark runs end to end (`bench.py --quick`) and prints its ratios; nothing about speed is asserted.

A benchmark is not a timed test: this only proves the script still works against the real
TorchServe (archives build, the no-op floor and our archives answer .npy and multipart JPEG from
both client kinds, answers match in-process embeddings, limit/raw/decode rows and the report and
its JSON are written) and that it cleans up after itself. Each run is a background job (it runs beside
the rest of the suite, image_embedder_testkit.background), so its figures are not measurements.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest

from image_embedder_testkit import background
from image_embedder_testkit.background import Completed, Lane
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_server import java_available

pytestmark = pytest.mark.server


def in_lane(*args: str) -> Callable[[Lane, str], tuple[Completed, Path]]:
    """A job: `python ARGS...` with its TMPDIR in the job's folder, where `{out}` in an argument points;
    returns what it did and the folder."""
    def work(lane: Lane, folder: str) -> tuple[Completed, Path]:
        cmd = [sys.executable, *(a.format(out=folder) for a in args)]
        return lane.run(cmd, cwd=REPO, env=dict(os.environ, TMPDIR=folder), timeout=420), Path(folder)
    return work


BENCH_QUICK = background.job("bench quick", in_lane(os.path.join(REPO, "scripts", "bench.py"), "--quick", "--json",
                                                    "{out}/bench.json"))
LAYOUTS_QUICK = background.job("layouts quick", in_lane("-m", "image_embedder_bench.layouts", "--quick", "--json",
                                                        "{out}/layouts.json", "--plot", "{out}/layouts.png"))
BREAKDOWN_QUICK = background.job("breakdown quick", in_lane("-m", "image_embedder_bench.bench_breakdown", "--quick",
                                                            "--json", "{out}/breakdown.json"))
THREAD_WAITS = background.job("thread waits", in_lane("-m", "image_embedder_bench.bench_threads", "--wait", "--rounds", "1"))
SOAK = background.job("soak", in_lane("-m", "image_embedder_bench.soak", "--minutes", "0.25", "--warmup-min", "0",
                                      "--sample-s", "2", "--clients", "3", "--csv", "{out}/soak.csv", "--plot",
                                      "{out}/soak.png", "--json", "{out}/soak.json"))


@pytest.mark.background(BENCH_QUICK.name)
def test_bench_quick_runs_and_reports_ratios():
    if not java_available():
        pytest.fail("the benchmark needs Java 17 for TorchServe")
    proc, tmp_path = BENCH_QUICK.result()
    out_json = tmp_path / "bench.json"
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


@pytest.mark.background(LAYOUTS_QUICK.name)
def test_layouts_quick_runs_every_layout_against_both_limits():
    """`image-embedder bench-layouts --quick`: every case on every layout, divided by its limit, the
    answers checked against the engine in process, worker memory per archive, a load verdict and a chart."""
    if not java_available():
        pytest.fail("the benchmark needs Java 17 for TorchServe")
    proc, tmp_path = LAYOUTS_QUICK.result()
    out_json, chart = tmp_path / "layouts.json", tmp_path / "layouts.png"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    assert not results["errors"], results["errors"]
    from image_embedder_bench.layouts import CASES, LAYOUTS

    cases = {c.id for c in CASES if c.quick}
    layouts = [l for l in LAYOUTS if l.default]
    assert {(r["case"], r["layout"]) for r in results["rows"]} == {(c, l.id) for c in cases for l in layouts}
    assert all(r["limit"] > 0 and r["ratio"] > 0 and len(r["rates"]) == 1 for r in results["rows"])
    assert {l["limit"] for l in results["limits"]} == {"single stream", "single-thread team"}
    cores = len(os.sched_getaffinity(0))
    assert {name: len(rss) for name, rss in results["rss_mb"].items()} == \
        {f"example-{l.id}": (l.workers or cores) for l in layouts}
    assert re.search(r"load average before \d+\.\d\d, after \d+\.\d\d: (quiet|NOT QUIET)", proc.stdout)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [d for d in os.listdir(tmp_path) if d.startswith(("bench-layouts-", "ts-test-"))]


@pytest.mark.background(SOAK.name)
def test_soak_samples_every_worker_and_checks_every_answer():
    """`image-embedder soak` for a few seconds: each worker's RSS in the CSV, no wrong answer, a chart."""
    if not java_available():
        pytest.fail("the soak needs Java 17 for TorchServe")
    proc, tmp_path = SOAK.result()
    csv_path, chart, summary = tmp_path / "soak.csv", tmp_path / "soak.png", tmp_path / "soak.json"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["wrong"] == 0 and result["answered"] > 0
    assert {k.split("/")[0] for k in result["counts"]} == {"npy4", "jpeg", "garbage"}  # the mix, every kind answered
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "seconds,worker_pid,rss_mb,answered,wrong"
    pids = {line.split(",")[1] for line in lines[1:]}
    assert len(pids) == len(result["workers"]) >= 1
    assert all(float(line.split(",")[2]) > 50 for line in lines[1:])  # a worker holding torch and a model
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.background(BREAKDOWN_QUICK.name)
def test_breakdown_quick_prints_the_fixed_cost_table():
    """`image-embedder bench-breakdown --quick`: transport, the batched no-op, the model and our archive,
    tiny and b32, with ours worked out, and our answers equal to the engine's in process."""
    if not java_available():
        pytest.fail("the benchmark needs Java 17 for TorchServe")
    proc, tmp_path = BREAKDOWN_QUICK.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "breakdown.json").read_text())
    assert not results["errors"], results["errors"]
    table = {line["id"]: line for line in results["table"]}
    assert set(table) == {"noop_b1", "noop_dyn", "model", "model_idle", "shipped"}
    for line in table.values():
        for payload in ("tiny", "b32"):
            assert 0 < line[payload]["median_ms"] <= line[payload]["p90_ms"], line
    shipped = table["shipped"]
    assert shipped["ours_ms"]["b32"] == pytest.approx(shipped["b32"]["median_ms"] - table["noop_dyn"]["b32"]["median_ms"]
                                                      - table["model"]["b32"]["median_ms"])
    assert set(results["checks"]) == {"shipped tiny", "shipped b32"}
    assert all(v <= 1e-5 for v in results["checks"].values()), results["checks"]
    assert re.search(r"^our archive, shipped defaults\s+\d+\.\d /\s*\d+\.\d", proc.stdout, re.M), proc.stdout
    assert results["load_before"] and results["load_after"]
    assert not [d for d in os.listdir(tmp_path) if d.startswith(("breakdown-", "ts-test-"))]


@pytest.mark.background(THREAD_WAITS.name)
def test_bench_threads_compares_how_threads_wait():
    """`image-embedder bench-threads --wait --rounds 1`: every setting timed in a process of its own, with
    its three figures printed (no figure is asserted: a benchmark is no timed test)."""
    from image_embedder_bench.bench_threads import WAITS

    proc, _ = THREAD_WAITS.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for name in WAITS:
        match = re.search(re.escape(name) + r"\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d)$", proc.stdout, re.M)
        assert match, proc.stdout
        rows[name] = [float(v) for v in match.groups()]
    assert all(b1 > 0 and b8 > 0 for b1, b8, _ in rows.values()), rows
    assert re.search(r"^load average before \d+\.\d\d", proc.stdout, re.M)
