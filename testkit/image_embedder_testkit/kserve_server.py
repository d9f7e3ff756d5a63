"""TorchServe started from a KServe storage layout exactly as KServe's kserve-torchserve runtime does:
`torchserve --start --model-store=<layout>/model-store --ts-config=<layout>/config/config.properties`
(no --foreground, no --ncs), with /mnt/models rewritten to the layout folder and the fixed ports
(8085, 8082, 7070, 7071) to free ones; private TMPDIR and working dir; TS_SERVICE_ENVELOPE as given
(KServe sets it from the serviceEnvelope label, "" when the label is unset)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time

import psutil
import requests

from image_embedder.thread_wait import SPIN_LIMIT
from image_embedder_testkit.ts_server import _torchserve, free_ports, log_tail, refuse_in_quick_tier


class KServeLayoutServer:
    """`start()` / `cleanup()`; `inference_url` serves both inference and management, as in KServe."""

    def __init__(self, layout: str, envelope: str = "") -> None:
        self.layout = os.path.abspath(layout)
        self.envelope = envelope
        self.workdir = tempfile.mkdtemp(prefix="ts-kserve-")
        self.tmpdir = os.path.join(self.workdir, "tmp")
        os.makedirs(self.tmpdir)
        inference, metrics, grpc_inf, grpc_mgmt = free_ports(4)
        self.inference_url = f"http://127.0.0.1:{inference}"
        self.metrics_url = f"http://127.0.0.1:{metrics}"
        self.config_path = os.path.join(self.workdir, "config.properties")
        with open(os.path.join(self.layout, "config", "config.properties")) as f:
            config = f.read()
        for old, new in (("/mnt/models", self.layout), ("127.0.0.1:8085", f"127.0.0.1:{inference}"),
                         ("0.0.0.0:8082", f"127.0.0.1:{metrics}")):
            assert old in config, f"{old} not in the layout's config.properties"
            config = config.replace(old, new)
        config = re.sub(r"^grpc_inference_port=7070$", f"grpc_inference_port={grpc_inf}", config, flags=re.M)
        config = re.sub(r"^grpc_management_port=7071$", f"grpc_management_port={grpc_mgmt}", config, flags=re.M)
        with open(self.config_path, "w") as f:
            f.write(config)
        self.log_path = os.path.join(self.workdir, "torchserve.out")

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}  # only what KServe would set
        env.update(TMPDIR=self.tmpdir, TEMP=self.tmpdir, TS_SERVICE_ENVELOPE=self.envelope)
        env.update([SPIN_LIMIT])  # the InferenceService's env (deploy/kserve)
        return env

    def start(self, model: str = "encoder", timeout: float = 240.0) -> "KServeLayoutServer":
        refuse_in_quick_tier()
        cmd = [_torchserve(), "--start", f"--model-store={self.layout}/model-store", f"--ts-config={self.config_path}"]
        with open(self.log_path, "wb") as out:
            # The launcher starts Java in the background and returns (KServe's entrypoint then runs its wrapper).
            subprocess.run(cmd, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=120, check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:  # what KServe's wrapper polls before it reports the model ready
                r = requests.get(f"{self.inference_url}/models/{model}", timeout=2)
                if r.status_code == 200 and any(w.get("status") == "READY" for w in r.json()[0].get("workers", [])):
                    return self
            except (requests.RequestException, ValueError, IndexError):
                pass
            time.sleep(0.3)
        self.cleanup()
        raise TimeoutError(f"{model} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.workdir, self.log_path, lines)

    def _java_pid(self) -> int | None:
        try:
            with open(os.path.join(self.tmpdir, ".model_server.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        """SIGKILL the frontend our TMPDIR's pid file names and its workers, then remove the folder. No test
        needs TorchServe's graceful stop (~2.5 s of Netty's quiet period); the launcher started Java in our
        own process group, so the tree is killed by pid, not by group."""
        pid = self._java_pid()
        try:
            frontend = psutil.Process(pid) if pid is not None else None
            tree = [frontend, *frontend.children(recursive=True)] if frontend else []
        except psutil.Error:
            tree = []
        for proc in tree:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)
