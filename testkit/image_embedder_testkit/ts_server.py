"""A real TorchServe for tests and scripts: free ports, private TMPDIR and working dir, token auth on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Union

import requests

from image_embedder.thread_wait import SPIN_LIMIT
from image_embedder_testkit.checkout import SHIPPED_CONFIG, SHIPPED_LOG_CONFIG

PORT_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_KEYS = ("grpc_inference_port", "grpc_management_port")
TLS_KEYS = ("private_key_file", "certificate_file")


@dataclass(frozen=True)
class ServerTls:
    """TorchServe's own HTTPS: the PEM files it serves (an RSA key, the certificate chain) and the CA
    bundle that clients verify them against."""

    certificate_file: str
    private_key_file: str
    ca_bundle: str


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def log_tail(workdir: str, launcher_log: str, lines: int = 60) -> str:
    """The last lines of the launcher's output and of the workers' log, for a failure message."""
    chunks = []
    for path in (launcher_log, os.path.join(workdir, "logs", "model_log.log")):
        try:
            with open(path, errors="replace") as f:
                chunks.append(f"--- {path}\n" + "".join(f.readlines()[-lines:]))
        except OSError:
            pass
    return "\n".join(chunks)


def java_available() -> bool:
    """Java 17 is on PATH: TorchServe's frontend needs it."""
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return 'version "17' in out.stderr or 'version "17' in out.stdout


QUICK_TIER = "IMAGE_EMBEDDER_QUICK_TIER"  # set by `scripts/test.sh --quick`: no TorchServe may start


def refuse_in_quick_tier() -> None:
    """A test without the `server` mark must not start TorchServe: the quick tier would stop being quick."""
    if os.environ.get(QUICK_TIER):
        raise RuntimeError(f"{QUICK_TIER} is set (scripts/test.sh --quick), yet a test starts TorchServe: "
                           "mark it @pytest.mark.server")


def _torchserve() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "torchserve")
    return local if os.path.exists(local) else (shutil.which("torchserve") or "torchserve")


class TorchServe:
    """Start with `start()`, stop with `stop()`; `inference_url`, `management_url`, `metrics_url`, `headers()`.

    With `tls`, every HTTP address is https:// with TorchServe's `private_key_file`/`certificate_file`,
    and `verify` (requests' argument, passed with each call) is the CA bundle; else it is True.
    `log_config`: the launchers' log4j2.xml; None: TorchServe's own (its ~45 lines a request)."""

    def __init__(self, model_store: str, models: str = "", overrides: Optional[dict] = None,
                 base_config: str = SHIPPED_CONFIG, env: Optional[dict] = None,
                 tls: Optional[ServerTls] = None, log_config: Optional[str] = SHIPPED_LOG_CONFIG) -> None:
        self.model_store = os.path.abspath(model_store)
        self.extra_env = dict(env or {})  # for the frontend and, through it, every worker; None unsets
        self.models = models
        self.log_config = log_config
        self.workdir = tempfile.mkdtemp(prefix="ts-test-")
        self.tmpdir = os.path.join(self.workdir, "tmp")
        os.makedirs(self.tmpdir)
        ports = free_ports(5)
        self.ports = dict(zip(PORT_KEYS + GRPC_KEYS, ports))
        self.tls = tls
        self.verify: Union[bool, str] = tls.ca_bundle if tls else True
        scheme = "https" if tls else "http"
        self.inference_url = f"{scheme}://127.0.0.1:{ports[0]}"
        self.management_url = f"{scheme}://127.0.0.1:{ports[1]}"
        self.metrics_url = f"{scheme}://127.0.0.1:{ports[2]}"
        self.config_path = os.path.join(self.workdir, "config.properties")
        self._write_config(base_config, overrides or {})
        self.keys: dict[str, str] = {}
        self.log_path = os.path.join(self.workdir, "torchserve.out")

    def _write_config(self, base_config: str, overrides: dict) -> None:
        lines = []
        with open(base_config) as f:
            for line in f:
                key = line.split("=", 1)[0].strip()
                if key in self.ports or key in overrides or key in TLS_KEYS or key == "model_store":
                    continue
                lines.append(line.rstrip("\n"))
        for key, url in zip(PORT_KEYS, (self.inference_url, self.management_url, self.metrics_url)):
            lines.append(f"{key}={url}")
        if self.tls:
            lines += [f"private_key_file={self.tls.private_key_file}", f"certificate_file={self.tls.certificate_file}"]
        for key in GRPC_KEYS:
            lines.append(f"{key}={self.ports[key]}")
        lines.append(f"model_store={self.model_store}")
        lines.extend(f"{k}={v}" for k, v in overrides.items())
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def env(self) -> dict:
        # the launchers' spin limit, then the caller's variables (None removes one)
        name, value = SPIN_LIMIT
        env = {**os.environ, name: value, **self.extra_env, "TMPDIR": self.tmpdir, "TEMP": self.tmpdir}  # TEMP: Java's tmpdir (worker sockets)
        env = {k: v for k, v in env.items() if v is not None}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    def start(self, timeout: float = 120.0, healthy: bool = True) -> "TorchServe":
        """Start and wait until /ping says Healthy; `healthy=False`: until it answers at all (a model whose
        workers can never start keeps it 500 Unhealthy while the other models serve). Refused while
        this server runs: a second start would leave the first one running, with nothing to stop it."""
        refuse_in_quick_tier()
        if getattr(self, "process", None) is not None:
            raise RuntimeError(f"TorchServe in {self.workdir} is already running (`with TorchServe(...)` starts it; "
                               "serve() is start() and the wait for workers)")
        cmd = [_torchserve(), "--start", "--ncs", "--foreground", "--model-store", self.model_store,
               "--ts-config", self.config_path]
        if self.models:
            cmd += ["--models", self.models]
        if self.log_config:
            cmd += ["--log-config", self.log_config]
        self._out = open(self.log_path, "wb")
        # --foreground keeps the Java process as our child, so it is ours to stop even if a test dies.
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=self._out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._read_keys():
                try:
                    # TorchServe 0.12 guards /ping with the inference token too.
                    r = requests.get(self.inference_url + "/ping", headers=self.headers(), timeout=2,
                                     verify=self.verify)
                    if r.status_code == 200 and r.json().get("status") == "Healthy" or (
                            not healthy and r.status_code == 500):
                        return self
                except requests.exceptions.SSLError as exc:  # listening, but no handshake will ever pass
                    self.stop()
                    raise RuntimeError(f"torchserve's TLS refused: {exc}\n{self.log_tail()}") from exc
                except (requests.RequestException, ValueError):
                    pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"torchserve not healthy after {timeout}s:\n{self.log_tail()}")

    def _read_keys(self) -> bool:
        path = os.path.join(self.workdir, "key_file.json")
        try:
            with open(path) as f:
                data = json.load(f)
            self.keys = {name: data[name]["key"] for name in ("inference", "management")}
            return True
        except (OSError, ValueError, KeyError):
            return False

    def headers(self, api: str = "inference", **extra: str) -> dict:
        """Authorization header for `api` ('inference' or 'management') plus any extra headers."""
        return {"Authorization": f"Bearer {self.keys[api]}", **extra}

    def wait_for_workers(self, model: str, count: int = 1, timeout: float = 120.0) -> None:
        """Block until `model` has `count` READY workers."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = requests.get(f"{self.management_url}/models/{model}", headers=self.headers("management"), timeout=5,
                             verify=self.verify)
            if r.status_code == 200:
                workers = r.json()[0].get("workers", [])
                if sum(w.get("status") == "READY" for w in workers) >= count:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{model} has fewer than {count} ready workers after {timeout}s")

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.workdir, self.log_path, lines)

    def stop(self, graceful: bool = False) -> None:
        """Stop the frontend and every worker: SIGKILL to the server's process group (its own session).
        `graceful`: `torchserve --stop` with our TMPDIR first, which flushes the logs but costs ~2.5 s
        (Netty's quiet period), which no test needs."""
        proc = getattr(self, "process", None)
        if proc is None:
            return
        if graceful:
            subprocess.run([_torchserve(), "--stop"], cwd=self.workdir, env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self._out.close()
        self.process = None

    def serve(self, *models: str, workers: int = 1, timeout: float = 120.0) -> "TorchServe":
        """start(), then wait until each of `models` has `workers` READY workers; if either fails, the
        server is stopped and its folder removed before the error goes on."""
        try:
            self.start(timeout=timeout)
            for model in models:
                self.wait_for_workers(model, workers, timeout=timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
