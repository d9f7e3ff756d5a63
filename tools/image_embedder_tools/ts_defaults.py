"""TorchServe's keys for an archive whose user brings no model-config.yaml, in one place: the build
writes them into the archive, the KServe layout falls back to them for an archive without them, and
examples/model-config.yaml shows them (tests/test_build_mar.py holds the copy)."""
from __future__ import annotations

from typing import Any

# Dynamic batching of up to 16 requests waiting at most 5 ms (a lone request pays the wait; 5 ms
# beat or tied 20 ms and 2 ms, and 0 ms lost every case but the crowd's:
# docs/performance.md#worker-layout). No worker count: TorchServe's default_workers_per_model
# decides on the serving machine (one per core on a CPU, one per GPU); the workers share the cores
# among those computing.
DEFAULT_TS_CONFIG: dict[str, Any] = {
    "batchSize": 16,
    "maxBatchDelay": 5,
    "responseTimeout": 120,
}
