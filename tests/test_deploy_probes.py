"""The Deployment's probe commands, run as written in deploy/k8s/deployment-cpu.yaml, against a real
TorchServe started with the ConfigMap's config.properties (token auth on): only the in-pod paths and
ports are rewritten (the image's /app -> this checkout, 8080/8081 -> free ports, the key file -> the
server's working dir). Readiness must need the key and a READY worker; liveness only an answer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
import yaml

from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.management import scale
from image_embedder_testkit.ts_server import TorchServe

pytestmark = pytest.mark.server
K8S = os.path.join(REPO, "deploy", "k8s")


def load(name: str) -> dict:
    with open(os.path.join(K8S, name)) as f:
        return yaml.safe_load(f)


CONTAINER = load("deployment-cpu.yaml")["spec"]["template"]["spec"]["containers"][0]
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def pod_workers() -> int:
    """The workers per model the ConfigMap's config.properties asks TorchServe for."""
    config = load("configmap.yaml")["data"]["config.properties"]
    return int(next(line.split("=", 1)[1] for line in config.splitlines()
                    if line.strip().startswith("default_workers_per_model=")))


@pytest.fixture(scope="module")
def pod_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pod") / "config.properties"
    path.write_text(load("configmap.yaml")["data"]["config.properties"])
    return str(path)


def start(model_store: str, config: str, server_class=TorchServe) -> TorchServe:
    return server_class(model_store, "encoder=encoder.mar", base_config=config).serve("encoder")


@pytest.fixture(scope="module")
def pod_server(model_store, example_archive, pod_config):
    server = start(model_store, pod_config)
    yield server
    server.cleanup()


def probe_command(probe: str, server: TorchServe, key_file: str | None = None) -> list[str]:
    """The manifest's exec command with the in-pod paths and ports rewritten for `server`."""
    pod_key_file = os.path.join(CONTAINER["workingDir"], "key_file.json")
    rewrite = {
        "/app/.venv/bin/python": sys.executable,
        "/app/deploy/probe.py": os.path.join(REPO, "deploy", "probe.py"),
        "http://127.0.0.1:8080": server.inference_url,
        "http://127.0.0.1:8081": server.management_url,
        pod_key_file: key_file or os.path.join(server.workdir, "key_file.json"),
    }
    command = CONTAINER[probe]["exec"]["command"]
    assert pod_key_file in command and command[0] in rewrite
    return [rewrite.get(arg, arg) for arg in command]


def run_probe(probe: str, server: TorchServe, key_file: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(probe_command(probe, server, key_file), capture_output=True, text=True,
                          timeout=CONTAINER[probe]["timeoutSeconds"] + 5)


def test_all_probes_pass_on_a_serving_pod(pod_server):
    for probe in PROBES:
        result = run_probe(probe, pod_server)
        assert result.returncode == 0, f"{probe}: {result.stderr}"
    pod_server.wait_for_workers("encoder", pod_workers())  # every worker the config asks for, loaded
    assert f"model encoder: {pod_workers()} READY worker" in run_probe("readinessProbe", pod_server).stdout


def test_readiness_needs_the_key(pod_server, tmp_path):
    with open(os.path.join(pod_server.workdir, "key_file.json")) as f:
        keys = json.load(f)
    keys["inference"]["key"] = "not-the-key"
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps(keys))
    result = run_probe("readinessProbe", pod_server, str(wrong))
    assert result.returncode == 1 and "/ping answered 400" in result.stderr and "InvalidKeyException" in result.stderr
    assert run_probe("livenessProbe", pod_server, str(wrong)).returncode == 0  # the frontend still answers


def test_readiness_needs_a_ready_worker(pod_server):
    scale(pod_server, "encoder", 0)
    try:
        result = run_probe("readinessProbe", pod_server)
        assert result.returncode == 1, result.stdout
        assert run_probe("livenessProbe", pod_server).returncode == 0
    finally:
        scale(pod_server, "encoder", 1)
        pod_server.wait_for_workers("encoder")
    assert run_probe("readinessProbe", pod_server).returncode == 0


class NoTokenServer(TorchServe):
    """Token auth off (no key_file.json to wait for); the header it sends is ignored."""

    def _read_keys(self) -> bool:
        self.keys = {"inference": "unused", "management": "unused"}
        return True


def test_probes_with_token_auth_turned_off_by_env(model_store, example_archive, pod_config, monkeypatch):
    """docs/deployment.md's switch for replicas behind a Service: TS_DISABLE_TOKEN_AUTHORIZATION=true
    (read because the ConfigMap sets enable_envvars_config=true); the probes send no key then."""
    monkeypatch.setenv("TS_DISABLE_TOKEN_AUTHORIZATION", "true")
    server = start(model_store, pod_config, NoTokenServer)
    try:
        assert not os.path.exists(os.path.join(server.workdir, "key_file.json"))
        assert requests.get(server.inference_url + "/ping", timeout=10).status_code == 200  # no token needed
        for probe in PROBES:
            result = run_probe(probe, server)
            assert result.returncode == 0, f"{probe}: {result.stderr}"
    finally:
        server.cleanup()
    result = run_probe("livenessProbe", server)
    assert result.returncode == 1 and "live:" in result.stderr  # nothing answers once it is stopped
