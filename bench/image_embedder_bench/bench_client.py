"""The bench's clients: threads that each send one body again and again over their own connection
(a `requests.Session`, what a user writes, or a gRPC channel: grpc_client.py); several threads are
several requests in flight."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import requests

Sender = Callable[[], tuple[Optional[str], bytes]]  # one request: (error or None, answer)


@dataclass
class RunResult:
    """One timed burst: requests answered, seconds, each request's latency, errors, one answer."""

    requests: int
    wall_s: float
    latencies_s: list[float]
    errors: list[str] = field(default_factory=list)
    sample: Optional[bytes] = None  # one answer's body, for a correctness check
    cpu_s: dict = field(default_factory=dict)  # served rows: CPU seconds by role (cpu_use.ROLES)


def run_threads(open_sender: Callable[[], tuple[Sender, Callable[[], None]]], clients: int,
                per_client: int) -> RunResult:
    """`clients` threads, each opening its own sender (and its close) and sending `per_client` requests
    in turn, all starting together; the wall time runs from the start to the last answer."""
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[bytes] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        send, close = open_sender()
        mine = []
        try:
            ready.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                error, answer = send()
                mine.append(time.perf_counter() - start)
                with lock:
                    if error:
                        errors.append(error)
                    elif not samples:
                        samples.append(answer)
        except Exception as exc:  # a broken connection is an error of the run, not a crash of the bench
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return RunResult(len(latencies), time.perf_counter() - start, latencies, errors, samples[0] if samples else None)


def run_clients(url: str, body: bytes, headers: dict, clients: int, per_client: int,
                timeout: float = 600.0) -> RunResult:
    """`clients` threads, each a requests.Session sending `per_client` POSTs of `body` to `url` in turn."""
    def open_sender() -> tuple[Sender, Callable[[], None]]:
        session = requests.Session()

        def send() -> tuple[Optional[str], bytes]:
            r = session.post(url, data=body, headers=headers, timeout=timeout)
            return (None if r.status_code == 200 else f"{r.status_code}: {r.content[:200]!r}"), r.content

        return send, session.close

    return run_threads(open_sender, clients, per_client)
