"""A served suite's run: every (model, serving) archive built, one TorchServe per environment, the rows
made (limits, then every case on every serving, and the LitServe peer when asked), one answer of each
checked against the engine in process, the rounds run, one report printed and returned."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import yaml

from image_embedder_testkit.checkout import SHIPPED_LOG_CONFIG
from image_embedder_testkit.management import worker_rss_mb
from image_embedder_testkit.ts_server import TorchServe, free_ports
from image_embedder_tools.build import ArchiveSpec, build_archive

from . import cpu_use, limits
from .bench_client import RunResult, run_clients
from .grpc_client import run_grpc_clients
from .framework import (SHAPE, Case, Engine, Row, Serving, archive_name, check_answer, cores, make_engines,
                        payload, run_rounds, server_key)

NOOP_HANDLER = '''"""Answers every request at once without reading it: what TorchServe alone costs."""


def handle(data, context):
    if data is None:  # TorchServe's initialization call
        return None
    return [b"[]"] * len(data)
'''


LIMIT_CALLS = 4  # timed calls of a limit per round and pass size, at most: in process, they vary little


@dataclass(frozen=True)
class Suite:
    """Servings x cases; `idle_limit`: also the single stream after idle (the fixed cost's)."""

    about: str
    servings: tuple[Serving, ...]
    cases: tuple[Case, ...]
    idle_limit: bool = False


def add_arguments(parser: argparse.ArgumentParser, suite: Suite) -> None:
    parser.add_argument("--servings", help="comma-separated serving ids (default: " + ", ".join(
        s.id for s in suite.servings if s.default) + "; also: " + (", ".join(
            s.id for s in suite.servings if not s.default) or "none") + ")")
    parser.add_argument("--peer", action="store_true", help="also the same job on LitServe (pip install litserve==0.2.19)")
    parser.add_argument("--plot", help="write a PNG chart here (needs matplotlib)")


def build(work: str, engines: dict[str, Engine], group: tuple[Serving, ...], index: int) -> tuple[str, dict[str, int]]:
    """The archives of one environment's servings in a store of their own; their worker counts."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    store = os.path.join(work, f"store{index}")
    os.makedirs(store)
    counts = {}
    for serving in group:
        count = serving.workers or cores()
        config = os.path.join(work, f"{serving.id}.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"minWorkers": count, "maxWorkers": count, "batchSize": serving.batch_size,
                            "maxBatchDelay": serving.delay_ms, "responseTimeout": 600}, f)
        if serving.noop:
            handler = os.path.join(work, "noop_handler.py")
            with open(handler, "w") as f:
                f.write(NOOP_HANDLER)
            generate_model_archive(ModelArchiverConfig(model_name=serving.id, handler=handler, version="1.0",
                                                       export_path=store, force=True, config_file=config))
            counts[serving.id] = count
            continue
        for model, engine in engines.items():
            settings = {**dict(engine.settings), **serving.settings}
            if serving.threads is not None:
                settings["num_threads"] = serving.threads or cores()
            name = archive_name(model, serving)
            build_archive(ArchiveSpec(engine.model_file, engine.model_class, engine.state_dict, engine.layer,
                                      input_shape=list(SHAPE), name=name, export_path=store, config_file=config,
                                      settings=settings), quiet=True)
            counts[name] = count
    return store, counts


def start_servers(work: str, engines: dict[str, Engine], servings: tuple[Serving, ...],
                  started: list[TorchServe]) -> dict[str, TorchServe]:
    """Archive name -> the TorchServe serving it, every worker READY; each server appended to `started`."""
    by_archive = {}
    for index, (env, launcher_logs) in enumerate(dict.fromkeys(map(server_key, servings))):
        group = tuple(s for s in servings if server_key(s) == (env, launcher_logs))
        store, counts = build(work, engines, group, index)
        server = TorchServe(store, ",".join(f"{n}={n}.mar" for n in counts), env=dict(env),
                            log_config=SHIPPED_LOG_CONFIG if launcher_logs else None)
        started.append(server)
        server.start(timeout=600)
        for name, count in counts.items():
            server.wait_for_workers(name, count, timeout=600)
            by_archive[name] = server
    return by_archive


def start_peer(engine: Engine, started: list[subprocess.Popen]) -> tuple[str, int]:
    """A LitServe server for this engine on a free port, once it answers its health check: its URL and
    process group."""
    import requests

    [port] = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "image_embedder_bench.litserve_peer", "--port", str(port),
                             "--model-file", engine.model_file, "--model-class", engine.model_class,
                             "--state-dict", engine.state_dict, "--layer", engine.layer,
                             "--settings", json.dumps(dict(engine.settings))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc.pid
        except requests.RequestException:
            pass
        time.sleep(0.3)  # poll interval
    raise RuntimeError("the LitServe peer did not start (is litserve installed? pip install litserve==0.2.19)")


def limit_rows(model: str, engine: Engine, cases: list[Case], suite: Suite, calls: int) -> dict[tuple, Row]:
    """(payload, limit label) -> the in-process limit rows the cases are divided by."""
    rows = {}
    for case in cases:
        name = case.limit_payload or case.payload
        images = payload(name).images
        wanted = {"single stream": lambda: limits.single_stream(engine, images, calls)}
        if case.limit == "team":
            wanted["team"] = lambda: limits.team(engine, images, calls)
        if suite.idle_limit:
            wanted["single stream after idle"] = lambda: limits.single_stream(engine, images, calls, limits.IDLE_S)
        for label, make in wanted.items():
            if (name, label) not in rows:
                rows[name, label] = Row(model, name, label, "limit", len(images), make())
    return rows


def served_rows(model: str, engine: Engine, case: Case, servings: tuple[Serving, ...],
                servers: dict[str, TorchServe], peer: Optional[tuple[str, int]], scale: int,
                measured_noops: set) -> tuple[list[Row], list[str]]:
    """The case on every serving (a no-op once per case, for any model) and the peer (URL, process
    group); each warmed up with one unmeasured round (TorchServe's JVM compiles its hot paths, every
    worker meets the case) and its answer checked against the engine's in process. Each round also
    records the CPU the server's processes, the clients and the idle cores took."""
    p = payload(case.payload)
    body, headers = p.body()
    expected = {}
    rows, problems = [], []
    targets = []  # (serving or None for the peer, server process group, go(clients, per_client) -> RunResult)
    for serving in servings:
        if serving.noop:
            if (case.id, serving.id) in measured_noops:
                continue
            measured_noops.add((case.id, serving.id))
        name = archive_name(model, serving)
        server = servers[name]
        if case.transport == "grpc":  # the body as the input `data`; no headers: sniffed, answered as JSON
            target = f"127.0.0.1:{server.ports['grpc_inference_port']}"
            key = server.headers()["Authorization"].split()[-1]
            targets.append((serving, server.process.pid,
                            lambda c, n, t=target, a=name, k=key: run_grpc_clients(t, a, body, k, c, n)))
        else:
            url, hdrs = f"{server.inference_url}/predictions/{name}", {**headers, **server.headers()}
            targets.append((serving, server.process.pid, lambda c, n, u=url, h=hdrs: run_clients(u, body, h, c, n)))
    if peer and case.transport == "rest":
        from .litserve_peer import request_body

        peer_body = request_body(p.images) if p.send in ("npy", "json") else request_body(jpegs=p.images)
        targets.append((None, peer[1], lambda c, n: run_clients(f"{peer[0]}/predict", peer_body,
                                                                {"Content-Type": "application/json"}, c, n)))
    for serving, group, go in targets:
        kind = "peer" if serving is None else "noop" if serving.noop else "served"
        label = "litserve" if serving is None else serving.id
        warm = go(case.clients, case.per_client)  # the unmeasured round; one of its answers is checked
        problems += warm.errors
        if kind == "served" or (kind == "peer" and p.send != "multipart"):  # the peer resizes JPEGs its own way
            settings = dict(serving.settings) if serving else {}
            key = tuple(sorted(settings.items()))
            if key not in expected:
                expected[key] = engine.work(cores(), p.images, **settings)[1]()
            problem = check_answer(warm.sample, expected[key], f"{model} {label} {case.id}")
            problems += [problem] if problem else []
        run = (lambda go=go, group=group: _with_cpu(group, lambda: go(case.clients, case.per_client * scale)))
        rows.append(Row("any" if kind == "noop" else model, case.id, label, kind, len(p.images), run))
    return rows, problems


def _with_cpu(group: int, go: Callable[[], RunResult]) -> RunResult:
    """go()'s result with the CPU seconds by role it took (cpu_use)."""
    before = cpu_use.snapshot(group)
    result = go()
    result.cpu_s = cpu_use.used(before, cpu_use.snapshot(group))
    return result


def _cpu_share(row: Row) -> Optional[dict[str, float]]:
    """Each role's CPU seconds over the cores' seconds of its round (cores x wall), median over rounds."""
    rounds = [r for r in row.results if r.cpu_s]
    if not rounds:
        return None
    return {role: statistics.median(r.cpu_s[role] / (cores() * r.wall_s) for r in rounds) for role in cpu_use.ROLES}


def limit_of(case: Case, limits_: dict[tuple, Row]) -> tuple[str, Row]:
    """The row a case is divided by: the single stream, or for `team` cases the better of it and the team."""
    name = case.limit_payload or case.payload
    single = limits_[name, "single stream"]
    if case.limit != "team" or limits_[name, "team"].rate <= single.rate:
        return ("single stream" if case.limit != "team" else "best layout (single stream)"), single
    return "best layout (team)", limits_[name, "team"]


def _ms(value: Optional[float]) -> str:
    return f"{value:8.1f}" if value is not None else f"{'':8}"


def report(by_model: dict, cases: list[Case], rss: dict, args: argparse.Namespace) -> dict:
    """Print every model's limits and cases; return the figures for --json."""
    print(f"\n{cores()} cores; {args.rounds} interleaved round(s): median images/s (spread), latency p50 / p90 "
          f"ms over every request; ratio to the case's limit")
    table, limit_table = [], []
    for model, (limits_, rows) in by_model.items():
        print(f"\n{model}")
        for (name, label), r in limits_.items():
            print(f"  limit {name:18} {label:28} {r.rate:8.1f} ({min(r.rates):.1f}-{max(r.rates):.1f})"
                  f"{_ms(r.latency_ms(50))}{_ms(r.latency_ms(90))}")
            limit_table.append({"model": model, "payload": name, "limit": label, "images_per_s": r.rate,
                                "rates": r.rates, "p50_ms": r.latency_ms(50), "p90_ms": r.latency_ms(90)})
        for case in (c for c in cases if model in c.models):
            limit_label, limit = limit_of(case, limits_)
            print(f"  {case.title}: divided by the {limit_label} limit, {limit.rate:.1f} img/s")
            for r in (r for r in rows if r.case == case.id):
                ratio = r.rate / limit.rate
                errors = f"  ERRORS {len(r.errors)}: {r.errors[0][:100]}" if r.errors else ""
                print(f"    {r.label:24} {r.rate:8.1f} ({min(r.rates):.1f}-{max(r.rates):.1f}){_ms(r.latency_ms(50))}"
                      f"{_ms(r.latency_ms(90))}  {ratio:5.2f}{errors}")
                table.append({"model": r.model, "case": case.id, "title": case.title, "layout": r.label,
                              "kind": r.kind, "images_per_s": r.rate, "rates": r.rates, "p50_ms": r.latency_ms(50),
                              "p90_ms": r.latency_ms(90), "ratio": ratio, "limit": limit.rate,
                              "limit_kind": case.limit, "limit_payload": case.limit_payload or case.payload,
                              "errors": r.errors, "cpu_share": _cpu_share(r)})
    print("\nwhere the cores went (share of cores x wall time, median of rounds): "
          + " / ".join(cpu_use.ROLES))
    for row in table:
        if row["cpu_share"]:
            shares = " / ".join(f"{row['cpu_share'][role]:.2f}" for role in cpu_use.ROLES)
            print(f"  {row['model']:9} {row['case']:16} {row['layout']:24} {shares}")
    print("\nworker memory (RSS MB per worker) by archive:")
    for name, values in rss.items():
        print(f"  {name:28} {' '.join(f'{v:.0f}' for v in values):24} total {sum(values):.0f}")
    return {"rows": table, "limits": limit_table, "rss_mb": rss, "cores": cores(), "rounds": args.rounds}


def run(suite: Suite, args: argparse.Namespace, work: str) -> dict:
    """Build, serve, measure and report `suite` (the servings and cases args select)."""
    chosen = args.servings.split(",") if args.servings else None
    servings = tuple(s for s in suite.servings if (s.id in chosen if chosen else s.default))
    cases = [c for c in suite.cases if (c.quick or not args.quick) and set(c.models) & set(args.models)]
    started: list = []
    peers: list = []
    try:
        engines = make_engines(work, [m for m in args.models if any(m in c.models for c in cases)])
        servers = start_servers(work, engines, servings, started)
        by_model, problems, noops = {}, [], set()
        for model, engine in engines.items():
            mine = [c for c in cases if model in c.models]
            peer = start_peer(engine, peers) if args.peer else None
            limits_ = limit_rows(model, engine, mine, suite, 1 if args.quick else min(LIMIT_CALLS, max(c.per_client for c in mine)))
            rows = []
            for case in mine:
                found, bad = served_rows(model, engine, case, servings, servers, peer, args.scale, noops)
                rows += found
                problems += bad
            by_model[model] = (limits_, rows)
        run_rounds([r for limits_, rows in by_model.values() for r in [*limits_.values(), *rows]], args.rounds)
        rss = {name: worker_rss_mb(server, name) for name, server in servers.items()}
        results = report(by_model, cases, rss, args)
        results["errors"] = problems + [e for row in results["rows"] for e in row["errors"]]
        for problem in problems:
            print(f"ERROR: {problem}")
        return results
    finally:
        for proc in peers:
            os.killpg(proc.pid, 9)
        for server in started:
            server.cleanup()
