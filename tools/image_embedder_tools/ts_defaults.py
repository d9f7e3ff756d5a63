"""TorchServe's keys for an archive whose user brings no model-config.yaml, in one place: the build
writes them into the archive, the KServe layout falls back to them for an archive without them, and
examples/model-config.yaml shows them (tests/test_build_mar.py holds the copy)."""
from __future__ import annotations

from typing import Any

# Dynamic batching of up to 16 requests waiting at most 1 ms: a lone request pays the wait, and 1 ms
# gave the example's b32 client 0.50-0.52 of the model against 0.38-0.41 at 5 ms, with crowds even
# (two runs; docs/performance.md#worker-layout). 0 is no choice: TorchServe reads it as unset, 100 ms.
# No worker count: TorchServe's default_workers_per_model decides on the serving machine (one per
# core on a CPU, one per GPU); the workers share the cores among those computing.
DEFAULT_TS_CONFIG: dict[str, Any] = {
    "batchSize": 16,
    "maxBatchDelay": 1,
    "responseTimeout": 120,
}
