"""The bench's CPU accounting (bench/image_embedder_bench/cpu_use.py): a server's process group split
into its Java frontend and the rest, against processes that burn known CPU."""
from __future__ import annotations

import subprocess
import sys

from image_embedder_bench import cpu_use

BURN = ("import sys, time\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # the test's snapshot comes first
        "start = time.process_time()\n"
        "while time.process_time() - start < float(sys.argv[1]): pass\n"
        "print('burnt', flush=True)\n"
        "sys.stdin.read()\n")  # alive, idle, until the test closes stdin


def _burner(seconds: float, argv0: str, group: int = 0) -> subprocess.Popen:
    """A process named `argv0` that says it is ready, burns `seconds` of CPU when told to, says so, and
    waits; in a new process group (its own, or `group`'s)."""
    return subprocess.Popen(["bash", "-c", f'exec -a {argv0} "{sys.executable}" -c "$0" {seconds}', BURN],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, process_group=group)


def test_a_groups_java_is_the_frontend_and_the_rest_its_workers():
    frontend = _burner(0.4, "java")
    worker = _burner(0.2, "python3", group=frontend.pid)
    outsider = _burner(0.3, "python3")  # another group: not counted
    burners = (frontend, worker, outsider)
    try:
        for proc in burners:
            assert proc.stdout.readline() == "ready\n"
        before = cpu_use.snapshot(frontend.pid)
        for proc in burners:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in burners:
            assert proc.stdout.readline() == "burnt\n"
        used = cpu_use.used(before, cpu_use.snapshot(frontend.pid))
    finally:
        for proc in burners:
            proc.communicate("")
    assert set(used) == set(cpu_use.ROLES)
    # what each burnt between the snapshots, to a few clock ticks; the outsider's 0.3 s is in neither
    assert 0.35 <= used["frontend"] <= 0.55, used
    assert 0.15 <= used["workers"] <= 0.35, used
    assert used["clients"] < 0.2 and all(v >= 0 for v in used.values()), used


def test_no_group_counts_only_this_process_and_the_machine():
    snap = cpu_use.snapshot(None)
    assert snap["frontend"] == snap["workers"] == 0.0
    assert snap["clients"] > 0 and snap["idle"] >= 0
    assert cpu_use.used(snap, dict(snap, idle=snap["idle"] - 1))["idle"] == 0.0  # never negative
