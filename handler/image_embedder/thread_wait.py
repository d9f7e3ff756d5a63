"""How long torch's OpenMP threads spin for more work before they sleep, when several workers share cores.

Between two parallel regions (two ops of a forward pass) libgomp's threads spin, then sleep. Its
default, 300 000 spins, keeps them spinning ~10 ms after a pass ends: with several workers on the same
cores that is CPU another worker's pass needs. Not spinning at all (`OMP_WAIT_POLICY=PASSIVE`) wakes
every thread from sleep at every op instead: a single-image ResNet-18 pass took a third longer.
10 000 spins (~0.5 ms) bridges the gaps between ops and sleeps soon after the pass
(docs/performance.md#the-fixed-cost-of-a-request; `image-embedder bench waits`).

libgomp reads it once, when torch loads: it belongs in TorchServe's environment, which every worker
inherits, and every launcher in this project sets it.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional

SPIN_LIMIT = ("GOMP_SPINCOUNT", "10000")
DEFAULT_SPINS = 300_000  # libgomp's count when neither variable is set
_COUNT = re.compile(r"\s*(\d+)\s*([kmgt]?)\s*", re.I)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def spin_count(environ: Mapping[str, str]) -> float:
    """The spins libgomp does before a thread sleeps, as it reads these variables (GOMP_SPINCOUNT:
    a count with an optional k/M/G/T suffix, or "infinite"; else OMP_WAIT_POLICY)."""
    raw = environ.get(SPIN_LIMIT[0])
    if raw is not None:
        if raw.strip().lower() in ("infinite", "infinity"):
            return float("inf")
        match = _COUNT.fullmatch(raw)
        if match:
            return int(match.group(1)) * _SUFFIX[match.group(2).lower()]
    policy = (environ.get("OMP_WAIT_POLICY") or "").strip().upper()
    return {"PASSIVE": 0, "ACTIVE": float("inf")}.get(policy, DEFAULT_SPINS)


def spinning_threads_warning(workers: int, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """A warning for the worker's log when several workers share the cores while OpenMP's threads spin
    longer than the launchers' limit after each pass, else None."""
    environ = os.environ if environ is None else environ
    name, limit = SPIN_LIMIT
    spins = spin_count(environ)
    if workers < 2 or spins <= int(limit):
        return None
    said = " ".join(f"{k}={environ[k]}" for k in (name, "OMP_WAIT_POLICY") if k in environ) or "neither set"
    return (f"{workers} workers share this machine's cores while torch's threads spin {spins:g} times for more "
            f"work after each pass ({said}), taking cores the other workers' passes need; set {name}={limit} in "
            f"TorchServe's environment before it starts (docs/deployment.md#workers-per-core-and-per-gpu)")
