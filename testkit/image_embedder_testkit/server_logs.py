"""What a TorchServe wrote to its log files, read from its working directory: the shipped log4j2.xml
keeps one access-log line a request and drops the rest of TorchServe's per-request lines."""
from __future__ import annotations

import os
import time
from typing import Callable

# what TorchServe 0.12 writes per request that the shipped config drops (tests/test_server_logs.py
# shows each one in TorchServe's own config)
PER_REQUEST = ("Backend received inference at: ", "Looping backend response at: ", "Backend response time: ",
               "Sending response for jobId ", "result=[METRICS]ImagesEmbedded", "[DEBUG]")
LOGS = ("logs/ts_log.log", "logs/model_log.log", "torchserve.out")  # the last: the launcher's stdout


def read_log(workdir: str, rel: str) -> str:
    """One log file's text ('' before TorchServe has written it)."""
    try:
        with open(os.path.join(workdir, rel), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def per_request_lines(workdir: str) -> dict[str, list[str]]:
    """Each log file that holds any of PER_REQUEST, with the ones it holds."""
    found = {rel: [line for line in PER_REQUEST if line in read_log(workdir, rel)] for rel in LOGS}
    return {rel: lines for rel, lines in found.items() if lines}


def accesses(workdir: str, path: str) -> int:
    """The access log's lines for answered (200) POSTs to `path`."""
    return read_log(workdir, "logs/access_log.log").count(f'"POST {path} HTTP/1.1" 200')


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Whether `check` held before `timeout`: the workers' lines and the access log's reach the files
    asynchronously (a reader thread, the answer sent first), so a test polls."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
