"""The benchmark's HTTP clients: payloads encoded once, sent again and again by client threads.

Two kinds of client thread: `light` owns one keep-alive http.client connection (no requests/urllib3
machinery: the cheapest client Python has), `requests` owns a `requests.Session` (what a user
writes). Several threads are several requests in flight. The bench process's own CPU time
and the server's process tree CPU time are read around the run, so the client's share of the two
shared cores is reported next to every served figure.
"""
from __future__ import annotations

import http.client
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import psutil
import requests


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU seconds of a process and all its live descendants (TorchServe + workers)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


@dataclass
class RunResult:
    """One timed burst of requests."""

    requests: int
    wall_s: float
    latencies_s: list[float]
    client_cpu_s: float
    server_cpu_s: float
    errors: list[str] = field(default_factory=list)
    sample: Optional[bytes] = None  # one response body, for a correctness check


CLIENT_KINDS = ("light", "requests")


class LightClient:
    """One keep-alive http.client connection."""

    def __init__(self, base_url: str, timeout: float) -> None:
        url = urlparse(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        self.conn.connect()

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


class RequestsClient:
    """One requests.Session, used the way a user's script uses it."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base, self.timeout = base_url, timeout
        self.session = requests.Session()

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        response = self.session.post(self.base + path, data=body, headers=headers, timeout=self.timeout)
        return response.status_code, response.content

    def close(self) -> None:
        self.session.close()


def run_clients(base_url: str, path: str, body: bytes, headers: dict, clients: int, per_client: int,
                server_pid: Optional[int] = None, timeout: float = 600.0, kind: str = "light") -> RunResult:
    """`clients` threads of the given kind, each sending `per_client` POSTs of `body`, one after another."""
    make = {"light": LightClient, "requests": RequestsClient}[kind]
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[bytes] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        conn = make(base_url, timeout)
        mine: list[float] = []
        try:
            ready.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                status, data = conn.post(path, body, headers)
                mine.append(time.perf_counter() - start)
                if status != 200:
                    with lock:
                        errors.append(f"{status}: {data[:200]!r}")
                elif not samples:
                    with lock:
                        samples.append(data)
        except Exception as exc:  # a broken connection is an error of the run, not a crash of the bench
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    cpu0, srv0 = own_cpu_seconds(), tree_cpu_seconds(server_pid)
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu1, srv1 = own_cpu_seconds(), tree_cpu_seconds(server_pid)
    return RunResult(len(latencies), wall, latencies, cpu1 - cpu0, srv1 - srv0, errors,
                     samples[0] if samples else None)
