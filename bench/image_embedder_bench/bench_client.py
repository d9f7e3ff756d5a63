"""The bench's clients: `requests.Session`s (what a user writes), each sending one body again and
again; several sessions at once are several requests in flight."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import requests


@dataclass
class RunResult:
    """One timed burst: requests answered, seconds, each request's latency, errors, one answer."""

    requests: int
    wall_s: float
    latencies_s: list[float]
    errors: list[str] = field(default_factory=list)
    sample: Optional[bytes] = None  # one response body, for a correctness check


def run_clients(url: str, body: bytes, headers: dict, clients: int, per_client: int,
                timeout: float = 600.0) -> RunResult:
    """`clients` threads, each a requests.Session sending `per_client` POSTs of `body` to `url` in turn."""
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[bytes] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        session, mine = requests.Session(), []
        try:
            ready.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                r = session.post(url, data=body, headers=headers, timeout=timeout)
                mine.append(time.perf_counter() - start)
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.content[:200]!r}")
                    elif not samples:
                        samples.append(r.content)
        except Exception as exc:  # a broken connection is an error of the run, not a crash of the bench
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            session.close()
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
