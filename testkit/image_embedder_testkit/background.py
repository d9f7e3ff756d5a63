"""Long, self-contained proofs run beside the suite instead of after it.

A few tests each run one command for a minute or more in a folder of their own (the docs run, the
benchmarks' smoke runs). Each such test module declares its command as a `Job`, and its test is
marked `@pytest.mark.background("<job name>")`. When the session starts, tests/conftest.py starts
the jobs of the selected tests in a lane of their own (one at a time, in a thread, beside the main
sequence of tests); each test then waits for its job's result and asserts on it, so no assertion
moves out of its test. On 2 cores this overlaps a job's waiting and single-threaded stretches with
the rest of the suite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Completed:
    """What a command did: its exit status and its whole output."""

    returncode: int
    stdout: str
    stderr: str


class Lane:
    """One thread that runs jobs one after another; `close()` kills whatever command still runs."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="background-lane")
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def track(self, proc: subprocess.Popen) -> None:
        """A command started in its own session by a job: killed with its process group on close()."""
        with self._lock:
            self._procs.add(proc)

    def untrack(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def run(self, cmd: list[str], *, cwd: str, env: dict, timeout: float) -> Completed:
        """Run `cmd` to its end (killed after `timeout` s), capturing its output as text."""
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.track(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n[background lane: killed after {timeout} s]"
        finally:
            self.untrack(proc)
        return Completed(proc.returncode, stdout, stderr)

    def close(self) -> None:
        """End the lane: queued jobs are dropped, running commands killed, the thread joined."""
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Job:
    """A long proof: `work(lane, folder)` runs in the lane and returns what the job's test asserts on."""

    name: str
    work: Callable[[Lane, str], Any]
    future: Optional[Future] = field(default=None, repr=False)

    def start(self, lane: Lane, folder: str) -> None:
        self.future = lane.submit(self.work, lane, folder)

    def result(self) -> Any:
        """Wait for the job's end and return its value (a job's own error is raised here)."""
        if self.future is None:
            raise RuntimeError(f"background job {self.name!r} was never started: mark its test "
                               f"@pytest.mark.background({self.name!r})")
        return self.future.result()


JOBS: dict[str, Job] = {}


def job(name: str, work: Callable[[Lane, str], Any]) -> Job:
    """Declare a background job (at a test module's import); its tests carry @pytest.mark.background(name)."""
    return JOBS.setdefault(name, Job(name, work))
