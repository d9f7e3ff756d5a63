"""Where the cores went during a served row: the CPU time of the server's processes (TorchServe's Java
frontend apart from its workers), of the bench's own clients, and the machine's idle time.

The bench starts each server in a process group of its own (TorchServe's launcher, its Java and the
workers Java starts; LitServe and its workers), so a server's processes are those of its group. A
crowd's ratio to the limit is bounded by what the frontend and the clients take of the same cores.
"""
from __future__ import annotations

import os
import time
from typing import Optional

TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("frontend", "workers", "clients", "idle")


def _group_cpu_s(pgid: int) -> tuple[float, float]:
    """(Java's, every other process's) CPU seconds, user + system, of the live processes in group `pgid`."""
    java = rest = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                program = os.path.basename(f.read().split(b"\0", 1)[0])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        if program == b"java":
            java += seconds
        else:
            rest += seconds
    return java, rest


def snapshot(pgid: Optional[int]) -> dict[str, float]:
    """Cumulative CPU seconds by role now: the server group's frontend and workers, this process (the
    clients' threads), and the machine's idle time over all cores."""
    frontend, workers = _group_cpu_s(pgid) if pgid is not None else (0.0, 0.0)
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return {"frontend": frontend, "workers": workers, "clients": time.process_time(),
            "idle": (cpu[3] + cpu[4]) / TICK}


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds by role between two snapshots (never below 0: a process that exits takes its time along)."""
    return {role: max(0.0, after[role] - before[role]) for role in ROLES}
