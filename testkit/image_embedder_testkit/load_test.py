"""Load and faults against a real TorchServe: concurrent clients that check every answer, while
workers are scaled 1 -> 3 -> 1 and one worker is killed with SIGKILL.

Each client owns distinct images and their reference embeddings (image_embedder_testkit.reference:
the model, a plain forward hook, pooling written out), so a wrong or crossed answer is caught, not
just an error.

    .venv/bin/python scripts/load_test.py                 # 16 clients, 30 s, scale at 5 s, kill at 20 s
    .venv/bin/python scripts/load_test.py --clients 8 --duration 60 --no-kill

It builds the example into a private model store and starts its own TorchServe on free ports (the
shipped config.properties, token auth on); tests/test_load_and_faults.py runs a short version.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import requests

from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.example_build import build_example, example_files
from image_embedder_testkit.management import scale, workers
from image_embedder_testkit.reference import load_reference_model, reference_embeddings
from image_embedder_testkit.ts_server import TorchServe

IMAGE_SHAPE = (3, 224, 224)


@dataclass
class Record:
    """One request: who sent it, when, and what came back."""

    client: int
    seq: int
    sent: float
    done: float
    status: Optional[int]  # None: no HTTP answer (timeout or connection error)
    outcome: str  # ok | wrong | crossed | out_of_step | http_error | timeout | connection_error
    detail: str = ""


@dataclass
class ClientInputs:
    bodies: list[bytes]
    expected: list[np.ndarray]


def make_inputs(model, clients: int, per_client: int, layer: str = "conv1", seed: int = 0) -> list[ClientInputs]:
    """Distinct images for every client, with their reference embeddings."""
    out = []
    for c in range(clients):
        images = np.random.default_rng(seed * 10_000 + c).random((per_client, *IMAGE_SHAPE), dtype=np.float32)
        images[:, 0, 0, 0] = c  # no two clients can ever send the same image
        expected = reference_embeddings(model, layer, images)
        out.append(ClientInputs([npy_bytes(im) for im in images], [e[None] for e in expected]))
    return out


class LoadRun:
    """`clients` threads posting .npy images to one model until `stop()`; every answer is checked."""

    def __init__(self, url: str, headers: dict, inputs: list[ClientInputs], timeout: float = 120.0,
                 atol: float = 1e-5) -> None:
        self.url, self.headers, self.inputs, self.timeout, self.atol = url, headers, inputs, timeout, atol
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(len(inputs))]

    def start(self) -> "LoadRun":
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Record]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 30)
        self.stopped = time.monotonic()
        return self.records

    def _classify(self, client: int, seq: int, got: np.ndarray) -> tuple[str, str]:
        mine = self.inputs[client].expected[seq % len(self.inputs[client].expected)]
        if got.shape == mine.shape and np.allclose(got, mine, atol=self.atol, rtol=0):
            return "ok", ""
        for other, inp in enumerate(self.inputs):
            if any(got.shape == e.shape and np.allclose(got, e, atol=self.atol, rtol=0) for e in inp.expected):
                return "crossed", f"got client {other}'s embedding"
        return "wrong", f"max abs diff {np.abs(got - mine).max() if got.shape == mine.shape else got.shape}"

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def wait_for(self, what: str, done, timeout: float) -> float:
        """Poll the records until `done(records)` holds; returns when (monotonic). Raises on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.snapshot()):
                return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"load run: {what} not reached within {timeout:.0f} s")

    def every_client(self, since: float, outcome: Optional[str] = "ok"):
        """A condition: every client has a record sent at or after `since` (with `outcome`, None: any)."""
        def done(records: list[Record]) -> bool:
            seen = {r.client for r in records if r.sent >= since and (outcome is None or r.outcome == outcome)}
            return len(seen) == len(self.inputs)
        return done

    def _client(self, client: int) -> None:
        session = requests.Session()
        headers = {**self.headers, "Content-Type": "application/x-npy"}
        seq = 0
        while not self._stop.is_set():
            body = self.inputs[client].bodies[seq % len(self.inputs[client].bodies)]
            sent = time.monotonic()
            status, outcome, detail = None, "ok", ""
            request_id = f"{client}-{seq}"
            try:
                r = session.post(self.url, data=body, headers={**headers, "Client-Request-Id": request_id},
                                 timeout=self.timeout)
                status = r.status_code
                if r.headers.get("Client-Request-Id", request_id) != request_id:
                    # the late answer to an earlier request (TorchServe answered a job twice): as the client
                    # does, never taken for this one; the connection is out of step, so it is closed
                    outcome, detail = "out_of_step", f"answer for request {r.headers['Client-Request-Id']}"
                    session.close()
                elif status == 200:
                    got = np.asarray(r.json()["embeddings"], np.float32)
                    outcome, detail = self._classify(client, seq, got)
                else:
                    outcome, detail = "http_error", r.text[:200]
                    session.close()  # as a careful client does: a lost batch's late answer may follow on it
            except requests.Timeout as exc:
                outcome, detail = "timeout", str(exc)[:200]
            except requests.RequestException as exc:
                outcome, detail = "connection_error", str(exc)[:200]
                session = requests.Session()
            with self._lock:
                self.records.append(Record(client, seq, sent, time.monotonic(), status, outcome, detail))
            seq += 1


# -- management API ----------------------------------------------------------------------------------

def kill_worker(server: TorchServe, model: str) -> tuple[int, float]:
    """SIGKILL one READY worker of `model` (its pid from the management API); returns (pid, when)."""
    ready = [w for w in workers(server, model) if w.get("status") == "READY" and int(w.get("pid", -1)) > 0]
    if not ready:
        raise RuntimeError(f"{model} has no READY worker to kill")
    pid = int(ready[0]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def wait_for_replacement(server: TorchServe, model: str, dead_pid: int, timeout: float = 120.0) -> float:
    """Block until a READY worker with a new pid serves `model`; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(w.get("status") == "READY" and int(w.get("pid", -1)) not in (-1, dead_pid)
                   for w in workers(server, model)):
                return time.monotonic()
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no replacement worker for {model} within {timeout}s")


# -- report ---------------------------------------------------------------------------------------------

def summarize(records: list[Record], start: float, end: float, kill_at: Optional[float] = None) -> dict:
    """Counts by outcome, latency percentiles of successful requests, throughput, and recovery."""
    ok = [r for r in records if r.outcome == "ok"]
    latencies = np.array([r.done - r.sent for r in ok]) * 1000 if ok else np.zeros(1)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    report = {
        "requests": len(records),
        "outcomes": counts,
        "failed_statuses": sorted({r.status for r in records if r.outcome == "http_error"}),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "max_ms": round(float(latencies.max()), 1),
        "images_per_s": round(len(ok) / max(end - start, 1e-9), 1),
        "duration_s": round(end - start, 1),
    }
    if kill_at is not None:
        after = [r.done for r in ok if r.sent >= kill_at]
        report["first_success_after_kill_s"] = round(min(after) - kill_at, 2) if after else None
        failed = [r for r in records if r.outcome != "ok"]
        report["failures_in_flight_at_kill"] = sum(r.sent <= kill_at <= r.done for r in failed)
        report["failures_sent_after_kill"] = sum(r.sent > kill_at for r in failed)
    return report


def scale_up_and_down(run: LoadRun, server: TorchServe, model: str, workers: int, phase_timeout: float,
                      log=print) -> dict:
    """Scale 1 -> `workers` -> 1 under `run`'s load: each step once every client has been answered after
    the previous one; returns the events (monotonic times; `_s` keys are durations)."""
    events: dict = {"scale_start": time.monotonic()}
    events["scale_up_s"] = round(scale(server, model, workers), 2)
    log(f"scaled to {workers} workers in {events['scale_up_s']} s")
    up = time.monotonic()
    run.wait_for(f"answers for every client from {workers} workers", run.every_client(up), phase_timeout)
    events["scale_down"] = time.monotonic()
    events["scale_down_s"] = round(scale(server, model, 1), 2)
    events["scale_end"] = time.monotonic()
    log(f"scaled back to 1 worker in {events['scale_down_s']} s")
    # every request in flight at the scale-down has ended (answered, failed or timed out)
    events["scale_settled"] = run.wait_for("every client past the scale-down",
                                           run.every_client(events["scale_end"], None), phase_timeout)
    return events


def kill_and_replace(run: LoadRun, server: TorchServe, model: str, phase_timeout: float, log=print) -> dict:
    """SIGKILL a worker under `run`'s load, wait for its replacement and for every client to be answered
    correctly after it; returns the events."""
    events: dict = {}
    pid, events["kill"] = kill_worker(server, model)
    log(f"SIGKILL worker pid {pid}")
    events["replaced"] = wait_for_replacement(server, model, pid)
    events["worker_back_s"] = round(events["replaced"] - events["kill"], 2)
    log(f"replacement worker READY after {events['worker_back_s']} s")
    events["kill_settled"] = run.wait_for("a correct answer for every client after the replacement",
                                          run.every_client(events["replaced"]), phase_timeout)
    return events


def run_scenario(server: TorchServe, model: str, inputs: list[ClientInputs], duration: float,
                 scale_at: Optional[float], kill_at: Optional[float], timeout: float = 120.0,
                 log=print) -> dict:
    """Load for at least `duration` s; scale 1->3->1 from `scale_at`, SIGKILL a worker from `kill_at`.

    Each phase waits on state, not on time: it starts once every client has had an answer after the
    previous one (so the phases' failures can't be mixed up), and the run ends once every client has
    had a correct answer from the replacement worker. `scale_at`/`kill_at` are only "not before" times.
    """
    run = LoadRun(f"{server.inference_url}/predictions/{model}", server.headers(), inputs, timeout).start()
    events: dict = {}
    t0 = run.started
    phase_timeout = timeout + 120.0  # a lost request resolves at the client timeout; then each client answers

    def wait_until(offset: float) -> None:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))

    try:
        run.wait_for("a first correct answer for every client", run.every_client(t0), phase_timeout)
        if scale_at is not None:
            wait_until(scale_at)
            events.update(scale_up_and_down(run, server, model, 3, phase_timeout, log))
        if kill_at is not None:
            wait_until(kill_at)
            events.update(kill_and_replace(run, server, model, phase_timeout, log))
        wait_until(duration)
    finally:
        records = run.stop()
    report = summarize(records, run.started, run.stopped, events.get("kill"))
    report.update({k: v for k, v in events.items() if k.endswith("_s")})
    report["events"] = {k: round(v - t0, 2) for k, v in events.items() if not k.endswith("_s")}
    report["records"] = records
    report["t0"] = t0
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--scale-at", type=float, default=5.0, help="seconds in: scale 1 -> 3 -> 1")
    parser.add_argument("--kill-at", type=float, default=20.0, help="seconds in: SIGKILL the worker")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--images-per-client", type=int, default=4)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    store = tempfile.mkdtemp(prefix="load-store-")
    model_file, weights = example_files(os.path.join(store, ".example"))
    build_example(store, files=(model_file, weights))
    model = load_reference_model(model_file, "CustomModel", weights)
    inputs = make_inputs(model, args.clients, args.images_per_client)
    server = TorchServe(store, "encoder=encoder.mar")
    try:
        server.start(timeout=240)
        print(f"TorchServe up on {server.inference_url}; {args.clients} clients for {args.duration:.0f} s")
        report = run_scenario(server, "encoder", inputs, args.duration,
                              None if args.no_scale else args.scale_at, None if args.no_kill else args.kill_at)
    finally:
        server.cleanup()
    failures = [r for r in report.pop("records") if r.outcome != "ok"]
    report.pop("t0")
    for r in failures[:20]:
        print(f"  failed: client {r.client} seq {r.seq} status {r.status} {r.outcome}: {r.detail[:120]}")
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    bad = report["outcomes"].get("wrong", 0) + report["outcomes"].get("crossed", 0) + report["outcomes"].get("timeout", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
