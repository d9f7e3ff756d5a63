"""Worker layouts side by side: what one client and a crowd get from each, against limits no layout beats.

    image-embedder bench-layouts                      # both models, 3 interleaved rounds (~10 min on 2 cores)
    image-embedder bench-layouts --quick              # smoke run: example model, 1 round
    image-embedder bench-layouts --plot out/layouts.png --json out/layouts.json
    image-embedder bench-layouts --peer               # also LitServe (pip install litserve==0.2.19)

One TorchServe hosts every layout (an archive each, of the same model and settings); rounds are
interleaved, every row once per round, so load from elsewhere hits every row alike; the median round
is shown with the spread. Single-client cases are divided by the single-stream limit (this process,
every thread), concurrent ones by the best-layout limit (see limits.py). Figures are for the docs only
from a quiet run: the load average is printed before and after, and a run that starts above 1.5 says so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np
import requests
import yaml

from image_embedder.npy_codec import read_npy
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import EXAMPLE_MODEL
from image_embedder_testkit.imagenet import IMAGENET
from image_embedder_testkit.management import workers
from image_embedder_testkit.ts_server import TorchServe, free_ports
from image_embedder_tools.build import ArchiveSpec, build_archive

from . import bench_models, limits
from .bench_client import RunResult, run_clients
from .bench_photos import jpegs
from .json_out import write_json
from .limits import Engine
from .soak import rss_mb

QUIET_LOAD = 1.5
SHAPE = (3, 224, 224)
NPY = "application/x-npy"
SERVER_SIDE = {**IMAGENET, "resize": 256, "center_crop": 224}  # every archive: uint8 pixels and JPEGs mean the same


SPINNING = {"GOMP_SPINCOUNT": None}  # libgomp's default: threads spin ~10 ms after each parallel region
PASSIVE = {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"}  # threads sleep at once


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one archive runs on the cores: workers (None: one per core), torch threads (None: shared by
    the busy workers, the default), TorchServe batching, the server's environment over the launchers'
    (a layout with its own environment gets a TorchServe of its own). `default`: run without --layouts."""

    id: str
    title: str
    workers: Optional[int] = None
    threads: Optional[int] = None  # 0: every core
    batch_size: int = 16
    max_batch_delay_ms: int = 20
    env: Mapping[str, Optional[str]] = field(default_factory=dict)
    default: bool = True


LAYOUTS = (
    Layout(id="1xall", title="1 worker x every thread", workers=1, threads=0),
    Layout(id="Nx1", title="1 worker per core x 1 thread", threads=1),
    Layout(id="Nxshared", title="1 worker per core, shared threads (default)"),
    Layout(id="Nxshared-5ms", title="1 worker per core, shared threads, 5 ms batching", max_batch_delay_ms=5),
    # choices of the shipped layout, by --layouts: the batch delay, how threads wait (thread_wait.py)
    Layout(id="Nxshared-0ms", title="shared threads, 0 ms batching", max_batch_delay_ms=0, default=False),
    Layout(id="Nxshared-2ms", title="shared threads, 2 ms batching", max_batch_delay_ms=2, default=False),
    Layout(id="Nxshared-5ms-spin", title="shared threads, 5 ms batching, libgomp's spin count",
           max_batch_delay_ms=5, env=SPINNING, default=False),
    Layout(id="Nxshared-5ms-passive", title="shared threads, 5 ms batching, OMP_WAIT_POLICY=PASSIVE",
           max_batch_delay_ms=5, env=PASSIVE, default=False),
)


@dataclass(frozen=True, kw_only=True)
class Case:
    """What clients send: a payload, how many clients, requests each; the limit it is divided by."""

    id: str
    title: str
    payload: str
    clients: int
    per_client: int
    limit: str  # "single" (single stream) or "best" (best layout)
    limit_payload: str = ""  # the work the limit times, if not the payload itself
    models: tuple = ("example", "resnet18")
    quick: bool = True


CASES = (
    Case(id="b32-seq", title="b32 uint8 .npy, 1 sequential client", payload="u8_32", clients=1, per_client=3,
         limit="single"),
    Case(id="b32-x2", title="b32 uint8 .npy, 2 in flight", payload="u8_32", clients=2, per_client=2, limit="best"),
    Case(id="1img-x16", title="1 image uint8 .npy, 16 clients", payload="u8_1", clients=16, per_client=4,
         limit="best", limit_payload="u8_16"),
    Case(id="jpeg-seq", title="16 JPEG 1280x960 multipart, 1 client", payload="jpeg_16", clients=1, per_client=2,
         limit="best", quick=False),
)


@dataclass
class Row:
    """One measured row: run once per round; images/s per round."""

    model: str
    kind: str  # limit | served | peer
    case: str
    layout: str
    run: Callable[[], float]
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


# -- payloads ----------------------------------------------------------------------------------
def make_payloads(quick: bool) -> dict:
    """Arrays and JPEG files by name (each the same in every process)."""
    u8 = np.random.default_rng(0).integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    payloads = {"u8_32": u8, "u8_16": u8[:16], "u8_1": u8[:1]}
    if not quick:
        payloads["jpeg_16"] = jpegs(16, 1280, 960, 3)
    return payloads


def http_body(images) -> tuple[bytes, dict]:
    """The body and headers our server gets: .npy for arrays, multipart for JPEGs; .npy back."""
    import urllib3

    if isinstance(images, np.ndarray):
        return npy_bytes(images if len(images) > 1 else images[0]), {"Content-Type": NPY, "Accept": NPY}
    body, content_type = urllib3.encode_multipart_formdata(
        [(f"img{i}", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)])
    return body, {"Content-Type": content_type, "Accept": NPY}


# -- set-up ------------------------------------------------------------------------------------
def make_engines(work: str, names: list[str]) -> dict[str, Engine]:
    """The example (conv1) and the ResNet-18-shaped model (layer4), both with server-side preprocessing."""
    engines = {}
    for name in names:
        folder = os.path.join(work, name)
        os.makedirs(folder)
        if name == "example":
            model_file = shutil.copy(EXAMPLE_MODEL, folder)
            weights = os.path.join(folder, "model_state_dict.pth")
            subprocess.run([sys.executable, model_file, weights], check=True, capture_output=True)
            engines[name] = Engine(model_file, "CustomModel", weights, "conv1", tuple(SERVER_SIDE.items()))
        else:
            model_file = shutil.copy(bench_models.__file__, folder)
            weights = bench_models.make_weights(os.path.join(folder, "resnet18.pth"))
            engines[name] = Engine(model_file, "ResNet18", weights, "layer4", tuple(SERVER_SIDE.items()))
    return engines


def build_layouts(work: str, engines: dict[str, Engine], layouts: tuple) -> tuple[str, dict[str, int]]:
    """An archive per model and layout in one store; TorchServe's `models` and the worker count of each."""
    store = os.path.join(work, f"store-{layouts[0].id}")
    os.makedirs(store, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    workers = {}
    for model, engine in engines.items():
        for layout in layouts:
            name = f"{model}-{layout.id}"
            count = layout.workers or cores
            config = os.path.join(work, f"{name}.yaml")
            with open(config, "w") as f:
                yaml.safe_dump({"minWorkers": count, "maxWorkers": count, "batchSize": layout.batch_size,
                                "maxBatchDelay": layout.max_batch_delay_ms, "responseTimeout": 600}, f)
            settings = dict(engine.settings)
            if layout.threads is not None:
                settings["num_threads"] = layout.threads or cores
            build_archive(ArchiveSpec(engine.model_file, engine.model_class, engine.state_dict, engine.layer,
                                      input_shape=list(SHAPE), name=name, export_path=store, config_file=config,
                                      settings=settings), quiet=True)
            workers[name] = count
    return store, workers


def start_peer(engine: Engine) -> tuple[subprocess.Popen, str]:
    """A LitServe server for this engine on a free port, once it answers its health check."""
    [port] = free_ports(1)
    settings = {k: v for k, v in engine.settings}
    proc = subprocess.Popen([sys.executable, "-m", "image_embedder_bench.litserve_peer", "--port", str(port),
                             "--model-file", engine.model_file, "--model-class", engine.model_class,
                             "--state-dict", engine.state_dict, "--layer", engine.layer,
                             "--settings", json.dumps(settings)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)  # poll interval
    proc.kill()
    raise RuntimeError("the LitServe peer did not start (is litserve installed? pip install litserve==0.2.19)")


def worker_rss_mb(server: TorchServe, name: str) -> list[float]:
    """Resident memory of each worker process of one archive (TorchServe's describe lists their pids)."""
    rss = (rss_mb(int(w.get("pid") or -1)) for w in workers(server, name))
    return [mb for mb in rss if mb is not None]


# -- rows --------------------------------------------------------------------------------------
def served(result: RunResult, images: int, errors: list[str]) -> float:
    errors.extend(result.errors)
    return result.requests * images / result.wall_s


def check_answer(sample: Optional[bytes], expected: np.ndarray, where: str) -> Optional[str]:
    if sample is None:
        return f"{where}: no answer to check"
    got = read_npy(sample) if sample[:6] == b"\x93NUMPY" else np.asarray(json.loads(sample)["embeddings"], np.float32)
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    return None if diff <= 1e-3 else f"{where}: served embedding differs from in-process by {diff:.2e}"


def make_rows(model: str, engine: Engine, cases: list[Case], layouts: tuple, payloads: dict,
              servers: dict[str, TorchServe], peer: Optional[str],
              args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Limit rows, then every case on every layout (and the peer), each warmed up and its answer checked."""
    rows, problems = [], []
    calls = 1 if args.quick else 2
    for name in sorted({c.limit_payload or c.payload for c in cases}):
        images = payloads[name]
        rows.append(Row(model, "limit", name, "single stream",
                        lambda i=images: limits.single_stream(engine, i, calls)))
        rows.append(Row(model, "limit", name, "single-thread team",
                        lambda i=images: limits.single_thread_team(engine, i, calls)))
    for case in cases:
        images = payloads[case.payload]
        expected = engine.work(1, images)[1]()  # the in-process answer to this payload
        body, headers = http_body(images)
        targets = [(layout.id, "served", servers[layout.id], f"/predictions/{model}-{layout.id}", body,
                    {**headers, **servers[layout.id].headers()}) for layout in layouts]
        if peer:
            from .litserve_peer import request_body

            peer_body = request_body(images) if isinstance(images, np.ndarray) else request_body(jpegs=images)
            targets.append(("litserve", "peer", peer, "/predict", peer_body, {"Content-Type": "application/json"}))
        for layout, kind, server, path, data, hdrs in targets:
            url, pid = (server.inference_url, server.process.pid) if kind == "served" else (server, None)
            warm = run_clients(url, path, data, hdrs, 1, 1, kind="requests")
            problems += warm.errors
            if kind == "served" or isinstance(images, np.ndarray):  # the peer resizes JPEGs its own way
                problem = check_answer(warm.sample, expected, f"{model} {layout} {case.id}")
                problems += [problem] if problem else []
            row = Row(model, kind, case.id, layout, lambda: 0.0)
            row.run = (lambda u=url, p=path, d=data, h=hdrs, c=case, r=row, n=len(images), pid=pid: served(
                run_clients(u, p, d, h, c.clients, c.per_client * args.scale, pid, kind="requests"), n, r.errors))
            rows.append(row)
    return rows, problems


# -- report ------------------------------------------------------------------------------------
def limit_of(rows: list[Row], model: str, case: Case) -> Optional[float]:
    mine = {r.layout: r.rate for r in rows if r.model == model and r.kind == "limit"
            and r.case == (case.limit_payload or case.payload)}
    if not mine:
        return None
    return mine["single stream"] if case.limit == "single" else max(mine.values())


def report(rows: list[Row], cases: list[Case], rss: dict, load: tuple, args: argparse.Namespace) -> dict:
    cores = len(os.sched_getaffinity(0))
    print(f"\n{cores} cores; {args.rounds} interleaved round(s): median images/s (spread); ratio to the case's limit")
    table = []
    for model in dict.fromkeys(r.model for r in rows):
        print(f"\n{model}")
        for r in rows:
            if r.model == model and r.kind == "limit":
                print(f"  limit   {r.case:8} {r.layout:44} {r.rate:8.1f} ({min(r.rates):.1f}-{max(r.rates):.1f})")
        for case in cases:
            if model not in case.models:
                continue
            limit = limit_of(rows, model, case)
            print(f"  {case.title} — divided by the {'single-stream' if case.limit == 'single' else 'best-layout'}"
                  f" limit, {limit:.1f} img/s")
            for r in rows:
                if r.model == model and r.case == case.id:
                    ratio = r.rate / limit if limit else float("nan")
                    errors = f"  ERRORS {len(r.errors)}: {r.errors[0][:100]}" if r.errors else ""
                    print(f"    {r.layout:14} {r.rate:8.1f} ({min(r.rates):.1f}-{max(r.rates):.1f})  {ratio:5.2f}{errors}")
                    table.append({"model": model, "case": case.id, "title": case.title, "layout": r.layout,
                                  "kind": r.kind, "images_per_s": r.rate, "rates": r.rates, "ratio": ratio,
                                  "limit": limit, "limit_kind": case.limit, "errors": r.errors})
    print("\nworker memory (RSS MB per worker) by archive:")
    for name, values in rss.items():
        print(f"  {name:28} {' '.join(f'{v:.0f}' for v in values):24} total {sum(values):.0f}")
    quiet = load[0] < QUIET_LOAD
    verdict = "quiet" if quiet else f"NOT QUIET (above {QUIET_LOAD}): these figures are not for the docs"
    print(f"\nload average before {load[0]:.2f}, after {load[1]:.2f}: {verdict}")
    return {"rows": table, "rss_mb": rss, "load_before": load[0], "load_after": load[1], "quiet": quiet,
            "cores": cores, "rounds": args.rounds,
            "limits": [{"model": r.model, "payload": r.case, "limit": r.layout, "images_per_s": r.rate, "rates": r.rates}
                       for r in rows if r.kind == "limit"]}


# -- the run -----------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: example model, 1 round, few requests")
    parser.add_argument("--models", help="comma-separated: example,resnet18 (default both; quick: example)")
    parser.add_argument("--layouts", help="comma-separated layout ids (default: " + ", ".join(l.id for l in LAYOUTS if l.default)
                        + "; also " + ", ".join(l.id for l in LAYOUTS if not l.default) + ")")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick: 1)")
    parser.add_argument("--scale", type=int, default=1, help="multiplies the requests of every served row")
    parser.add_argument("--peer", action="store_true", help="also the same job on LitServe (pip install litserve==0.2.19)")
    parser.add_argument("--plot", help="write a PNG chart here (needs matplotlib)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    args.models = (args.models or ("example" if args.quick else "example,resnet18")).split(",")
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def run_rounds(rows: list[Row], rounds: int) -> None:
    """Every row once per round, in a fixed order: load from elsewhere hits every row alike."""
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        for row in rows:
            row.rates.append(row.run())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    print(f"load average {load_before:.2f}" + ("" if load_before < QUIET_LOAD else
          f": above {QUIET_LOAD}, the machine is not quiet; figures from this run are not for the docs"), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout must still stop the servers
    layouts = tuple(l for l in LAYOUTS if (l.id in args.layouts.split(",") if args.layouts else l.default))
    cases = [c for c in CASES if c.quick or not args.quick]
    work = tempfile.mkdtemp(prefix="bench-layouts-")
    started: list[TorchServe] = []
    peers = []
    try:
        payloads = make_payloads(args.quick)
        engines = make_engines(work, args.models)
        servers: dict[str, TorchServe] = {}  # layout id -> its TorchServe, one per environment
        archive_servers: dict[str, TorchServe] = {}  # archive name -> the TorchServe serving it
        for env in dict.fromkeys(tuple(sorted(l.env.items())) for l in layouts):
            group = tuple(l for l in layouts if tuple(sorted(l.env.items())) == env)
            store, counts = build_layouts(work, engines, group)
            server = TorchServe(store, ",".join(f"{n}={n}.mar" for n in counts), env=dict(env))
            started.append(server)
            server.start(timeout=600)
            for name, count in counts.items():
                server.wait_for_workers(name, count, timeout=600)
            servers.update({l.id: server for l in group})
            archive_servers.update({name: server for name in counts})
        rows, problems = [], []
        for model, engine in engines.items():
            peer = None
            if args.peer:
                proc, peer = start_peer(engine)
                peers.append(proc)
            mine, found = make_rows(model, engine, [c for c in cases if model in c.models], layouts, payloads,
                                    servers, peer, args)
            rows += mine
            problems += found
        run_rounds(rows, args.rounds)
        rss = {name: worker_rss_mb(server, name) for name, server in archive_servers.items()}
        results = report(rows, cases, rss, (load_before, os.getloadavg()[0]), args)
        results["errors"] = problems + [e for r in rows for e in r.errors]
        for problem in problems:
            print(f"ERROR: {problem}")
        write_json(args.json, results)
        if args.plot:
            from .plot import plot_layouts

            plot_layouts(results, args.plot)
            print(f"chart: {args.plot}")
        return 1 if results["errors"] else 0
    finally:
        for proc in peers:
            os.killpg(proc.pid, signal.SIGKILL)
        for server in started:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
