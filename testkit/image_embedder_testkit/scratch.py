"""A scratch copy of this checkout, for proofs that run its scripts as a user would (the docs run, the
serve-only install): the working tree as git sees it, with config.properties moved to free ports so
that it never meets another server."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

from .checkout import REPO

PORTS = {"8080": 0, "8081": 1, "8082": 2, "7070": 3, "7071": 4}  # index into the free ports
GRPC_PORTS = {"grpc_inference_port": PORTS["7070"], "grpc_management_port": PORTS["7071"]}  # config.properties' keys


def free_ports(count: int) -> list[str]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rewrite_ports(text: str, ports: list[str]) -> str:
    """The docs' fixed ports -> this run's free ones, wherever an address names them."""
    return re.sub(rf"\b(127\.0\.0\.1|localhost):({'|'.join(PORTS)})\b",
                  lambda m: f"{m.group(1)}:{ports[PORTS[m.group(2)]]}", text)


def tree_files() -> list[str]:
    """The working tree as git sees it: tracked and untracked-not-ignored files that exist."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [rel for rel in listed if rel and os.path.isfile(os.path.join(REPO, rel))]  # not deleted ones


def scratch_copy(dest: str, ports: list[str], link_venv: bool = True) -> None:
    """A copy of the working tree with config.properties on free ports, and this checkout's .venv linked
    (`link_venv`) or none (the copy makes its own)."""
    for rel in tree_files():
        src = os.path.join(REPO, rel)
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel), follow_symlinks=False)
    if link_venv:
        os.symlink(os.path.realpath(os.path.join(REPO, ".venv")), os.path.join(dest, ".venv"))
    config = os.path.join(dest, "config.properties")
    with open(config) as f:
        text = rewrite_ports(f.read(), ports)
    for key, index in GRPC_PORTS.items():
        text = re.sub(rf"^{key}=\d+$", f"{key}={ports[index]}", text, flags=re.M)
    with open(config, "w") as f:
        f.write(text)
