"""Every bench suite runs end to end (`--quick`) and prints its figures; nothing about speed is asserted.

A benchmark is not a timed test: this only proves each suite still works against the real
TorchServe (archives build, the no-ops and our archives answer, answers match in-process embeddings,
limits, the report and its JSON are written) and that it cleans up after itself. Each run is a background job (it runs beside
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


def bench(name: str, *args: str) -> background.Job:
    return background.job(name, in_lane(os.path.join(REPO, "scripts", "bench.py"), *args))


PAYLOADS_QUICK = bench("payloads quick", "payloads", "--quick", "--json", "{out}/bench.json")
LAYOUTS_QUICK = bench("layouts quick", "layouts", "--quick", "--json", "{out}/layouts.json", "--plot", "{out}/layouts.png")
FIXED_COST_QUICK = bench("fixed cost quick", "fixed-cost", "--quick", "--json", "{out}/fixed.json")
TRANSPORT_QUICK = bench("transport quick", "transport", "--quick", "--json", "{out}/transport.json")
IN_PROCESS_QUICK = {name: bench(f"{name} quick", name, "--quick", "--rounds", "1", "--json", "{out}/out.json")
                    for name in ("waits", "decode", "options")}
SOAK = background.job("soak", in_lane("-m", "image_embedder_testkit.soak", "--minutes", "0.25", "--warmup-min", "0",
                                      "--sample-s", "2", "--clients", "3", "--csv", "{out}/soak.csv", "--plot",
                                      "{out}/soak.png", "--json", "{out}/soak.json"))


def finished(job: background.Job, out: str) -> tuple[str, dict, Path]:
    """A bench job that exited 0 with no error, its stdout, its JSON and its folder (emptied of its own
    temporary directories: the bench's TorchServes are gone)."""
    if not java_available():
        pytest.fail("the benchmark needs Java 17 for TorchServe")
    proc, tmp_path = job.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / out).read_text())
    assert not results["errors"], results["errors"]
    assert re.search(r"load average before \d+\.\d\d, after \d+\.\d\d: (quiet|NOT QUIET)", proc.stdout)
    assert not [d for d in os.listdir(tmp_path) if d.startswith(("bench-", "ts-test-"))]
    return proc.stdout, results, tmp_path


def served_cases(suite, results: dict) -> None:
    """Every quick case on every default serving answered, checked, and divided by its limit."""
    servings = [s.id for s in suite.servings if s.default]
    cases = [c.id for c in suite.cases if c.quick and "example" in c.models]
    assert sorted((r["case"], r["layout"]) for r in results["rows"]) == sorted((c, s) for c in cases for s in servings)
    assert all(r["limit"] > 0 and r["ratio"] > 0 and len(r["rates"]) == 1 and 0 < r["p50_ms"] <= r["p90_ms"]
               for r in results["rows"]), results["rows"]
    # where the cores went: every role's share of the round's core-seconds. Process CPU counts in clock
    # ticks (10 ms), which a short quick row may miss: the servers' time is checked over all rows.
    from image_embedder_bench.cpu_use import ROLES

    for r in results["rows"]:
        share = r["cpu_share"]
        assert set(share) == set(ROLES) and all(0 <= v <= 1.5 for v in share.values()), r
        assert share["clients"] > 0, r  # this process's own CPU clock: nanoseconds
    assert sum(r["cpu_share"]["workers"] + r["cpu_share"]["frontend"] for r in results["rows"]) > 0
    cores = len(os.sched_getaffinity(0))
    assert {name: len(rss) for name, rss in results["rss_mb"].items()} == \
        {(s.id if s.noop else f"example-{s.id}"): (s.workers or cores) for s in suite.servings if s.default}


@pytest.mark.background(PAYLOADS_QUICK.name)
def test_payloads_quick_divides_every_case_by_its_limit():
    """`bench payloads --quick`: .npy and multipart JPEG on our archive beside both no-ops, each served
    answer equal to the engine's in process (the run fails otherwise), every row a ratio to its limit."""
    from image_embedder_bench.suites import PAYLOADS

    out, results, _ = finished(PAYLOADS_QUICK, "bench.json")
    served_cases(PAYLOADS, results)
    assert {r["kind"] for r in results["rows"]} == {"served", "noop"}
    assert {(l["payload"], l["limit"]) for l in results["limits"]} >= {("u8_32", "single stream"), ("u8_16", "team")}
    assert re.search(r"^  16 JPEG 640x480 multipart: divided by the best layout \((team|single stream)\) limit", out, re.M)


@pytest.mark.background(LAYOUTS_QUICK.name)
def test_layouts_quick_runs_every_layout_against_both_limits():
    """`bench layouts --quick`: every case on every layout, divided by its limit, the answers checked
    against the engine in process, worker memory per archive, a load verdict and a chart."""
    from image_embedder_bench.suites import LAYOUTS

    _, results, tmp_path = finished(LAYOUTS_QUICK, "layouts.json")
    served_cases(LAYOUTS, results)
    assert {l["limit"] for l in results["limits"]} == {"single stream", "team"}
    assert (tmp_path / "layouts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.background(TRANSPORT_QUICK.name)
def test_transport_quick_answers_over_rest_and_grpc():
    """`bench transport --quick`: every case over REST and over TorchServe's gRPC inference API (our
    hand-written Predictions messages), our archive's answers equal to the engine's in process either way."""
    from image_embedder_bench.suites import TRANSPORT

    _, results, _ = finished(TRANSPORT_QUICK, "transport.json")
    served_cases(TRANSPORT, results)
    assert {r["case"].rsplit("-", 1)[1] for r in results["rows"] if r["kind"] == "served"} == {"rest", "grpc"}


@pytest.mark.background(FIXED_COST_QUICK.name)
def test_fixed_cost_quick_prints_ours():
    """`bench fixed-cost --quick`: transport, the batched no-op, the model (back to back and after idle)
    and our archive, tiny and b32, with ours worked out from the same run's medians."""
    from image_embedder_bench.suites import FIXED_COST

    out, results, _ = finished(FIXED_COST_QUICK, "fixed.json")
    served_cases(FIXED_COST, results)
    rows = {(r["case"], r["layout"]): r for r in results["rows"]}
    limits = {(l["payload"], l["limit"]): l for l in results["limits"]}
    [b32] = [o for o in results["ours"] if o["case"] == "b32"]
    assert b32["ours_ms"] == pytest.approx(rows["b32", "shipped"]["p50_ms"] - rows["b32", "noop-batched"]["p50_ms"]
                                           - limits["u8_32", "single stream"]["p50_ms"])
    assert ("tiny", "single stream after idle") in limits
    assert re.search(r"^  shipped\s+tiny\s+-?\d+\.\d / -?\d+\.\d", out, re.M), out


def check_waits(out: str, results: dict) -> None:
    from image_embedder_bench.waits import WAITS

    assert [r["setting"] for r in results["rows"]] == list(WAITS)
    assert all(r["b1_ms"] > 0 and r["b8_ms"] > 0 for r in results["rows"]), results["rows"]


def check_decode(out: str, results: dict) -> None:
    from image_embedder_bench.decode import PATHS

    assert [r["path"] for r in results["rows"]] == list(PATHS)
    assert all(r["min_cosine"] > 0.99 and len(r["images_per_s"]) >= 1 for r in results["rows"]), results["rows"]


def check_options(out: str, results: dict) -> None:
    usable = [r for r in results["rows"] if "error" not in r]
    assert usable[0]["option"] == "float32 eager" and usable[0]["max_abs"] == 0
    assert {r["option"] for r in usable} >= {"channels_last", "early_exit off"}
    assert all(r["min_cosine"] > 0.99 for r in usable), usable


@pytest.mark.parametrize("name, check", [
    pytest.param(name, check, marks=pytest.mark.background(IN_PROCESS_QUICK[name].name), id=name)
    for name, check in (("waits", check_waits), ("decode", check_decode), ("options", check_options))])
def test_in_process_suites_print_their_figures(name, check):
    """`bench waits|decode|options --quick`: every setting, JPEG path and option timed (no figure is
    asserted: a benchmark is no timed test), the fast paths and options compared with the exact ones."""
    out, results, _ = finished(IN_PROCESS_QUICK[name], "out.json")
    check(out, results)


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
