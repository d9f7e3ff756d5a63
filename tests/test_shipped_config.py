"""The shipped configuration is safe: token auth on, loopback only, model API off, local archives only.

The session `torchserve` fixture runs config.properties as shipped (only its ports are substituted
by the TorchServe class), so the live checks use it; a static check keeps config.properties and
every script from switching any of this off.
"""
from __future__ import annotations

import glob
import ipaddress
import os
import re

import psutil
import pytest
import requests
import yaml

from image_embedder.thread_wait import SPIN_LIMIT
from image_embedder_testkit.checkout import REPO, SHIPPED_CONFIG
from image_embedder_testkit.management import workers

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def read_properties(path: str) -> dict[str, str]:
    props = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


# -- static -----------------------------------------------------------------------------------------

def test_shipped_config_properties_is_safe():
    props = read_properties(SHIPPED_CONFIG)
    assert props.get("disable_token_authorization") == "false"
    assert props.get("enable_model_api") == "false"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"https?://127\.0\.0\.1:\d+", props[key]), (key, props[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert props[key] == "127.0.0.1", (key, props[key])
    patterns = [p.strip() for p in props["allowed_urls"].split(",")]
    assert patterns and all(p.startswith("file://") for p in patterns), patterns
    assert int(props["max_request_size"]) == 128 * 1024 * 1024  # what the README states
    for key, value in props.items():
        assert "0.0.0.0" not in value and "[::]" not in value, (key, value)


def script_files() -> list[str]:
    paths = glob.glob(os.path.join(REPO, "scripts", "*")) + glob.glob(os.path.join(REPO, ".ci", "*"))
    return sorted(p for p in paths if os.path.isfile(p))


def test_scripts_keep_the_safe_defaults():
    unsafe = [
        (r"disable_token_authorization\s*=\s*true|--disable-token-auth", "token authorization switched off"),
        (r"enable_model_api\s*=\s*true|--enable-model-api", "model API switched on"),
        (r"0\.0\.0\.0|\[::\]", "a listener beyond loopback"),
        (r"allowed_urls\s*=\s*(?!file://)", "allowed_urls beyond local files"),
        (r"TS_DISABLE_TOKEN_AUTHORIZATION|TS_ENABLE_MODEL_API", "safety switched via the environment"),
    ]
    scripts = script_files()
    assert any(p.endswith("serve.sh") for p in scripts)
    for path in scripts:
        with open(path, errors="replace") as f:
            text = f.read()
        for pattern, why in unsafe:
            match = re.search(pattern, text)
            assert match is None, f"{os.path.relpath(path, REPO)}: {why}: {match.group(0)!r}"
        for line in text.splitlines():  # every TorchServe a script starts reads the shipped configs
            if re.search(r"torchserve\s+--start", line) and not line.lstrip().startswith("#"):
                assert "--ts-config config.properties --log-config log4j2.xml" in line, \
                    f"{os.path.relpath(path, REPO)}: {line.strip()}"


def container_envs(doc: dict) -> list[dict]:
    """The environment of every container a Kubernetes object runs: a Deployment's, an InferenceService's model."""
    if doc.get("kind") == "Deployment":
        return [{e["name"]: e.get("value") for e in c.get("env", [])} for c in doc["spec"]["template"]["spec"]["containers"]]
    if doc.get("kind") == "InferenceService":
        return [{e["name"]: e.get("value") for e in doc["spec"]["predictor"]["model"].get("env", [])}]
    return []


def test_every_launcher_limits_the_spinning():
    """TorchServe's workers inherit its environment, and libgomp reads the limit when torch loads: every
    way this project starts TorchServe sets it (the test kit's is checked live, below)."""
    name, value = SPIN_LIMIT
    with open(os.path.join(REPO, "scripts", "serve.sh")) as f:
        serve = f.read()
    export = serve.index(f"\nexport {name}={value}\n")
    assert export < serve.index("torchserve --start")
    for dockerfile in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
        with open(os.path.join(REPO, dockerfile)) as f:
            env = re.findall(r"^ENV ((?:.*\\\n)*.*)$", f.read(), flags=re.M)
        assert re.search(rf"\b{name}={value}\b", " ".join(env)), dockerfile
    launchers = 0
    for path in glob.glob(os.path.join(REPO, "deploy", "*", "*.yaml")):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                for env in container_envs(doc or {}):
                    assert env.get(name) == value, f"{os.path.relpath(path, REPO)}: {name}={env.get(name)}"
                    launchers += 1
    assert launchers == 4  # two Deployments, two InferenceServices
    shown = [line for page in [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]
             for line in open(page) if re.match(r"\S*\.venv/bin/torchserve --start|\S+=\S+ \.venv/bin/torchserve --start", line)]
    assert shown and all(line.startswith(f"{name}={value} ") for line in shown), shown


def test_every_launcher_passes_the_log_config():
    """The shipped log4j2.xml (one access-log line a request; tests/test_server_logs.py) is every
    launcher's: the scripts' (above), the pages', the images' (COPY . /app) and the Deployments' (the
    KServe layout's: tests/test_deploy_kserve.py)."""
    assert os.path.isfile(os.path.join(REPO, "log4j2.xml"))
    shown = [line for page in [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]
             for line in open(page) if re.search(r"\.venv/bin/torchserve --start", line)]
    assert shown and all("--ts-config config.properties --log-config log4j2.xml " in line for line in shown), shown
    for dockerfile in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
        with open(os.path.join(REPO, dockerfile)) as f:
            text = f.read()
        assert "COPY . /app" in text, dockerfile
        [cmd] = re.findall(r"^CMD (.*)$", text, flags=re.M)
        assert '"--log-config", "/app/log4j2.xml"' in cmd, dockerfile
    commands = []
    for path in glob.glob(os.path.join(REPO, "deploy", "k8s", "deployment-*.yaml")):
        with open(path) as f:
            commands += [c["command"] for doc in yaml.safe_load_all(f) if (doc or {}).get("kind") == "Deployment"
                         for c in doc["spec"]["template"]["spec"]["containers"]]
    assert len(commands) == 2 and all(c[c.index("--log-config") + 1] == "/app/log4j2.xml" for c in commands), commands


# -- live, against the shipped configuration ---------------------------------------------------------

@pytest.mark.server
def test_requests_without_the_token_are_refused(torchserve):
    inference, management = torchserve.inference_url, torchserve.management_url
    attempts = [
        ("GET", f"{inference}/ping", {}),
        ("POST", f"{inference}/predictions/encoder", {"Content-Type": "application/json"}),
        ("GET", f"{management}/models", {}),
        ("PUT", f"{management}/models/encoder?min_worker=2", {}),
        ("POST", f"{inference}/predictions/encoder", {"Authorization": "Bearer not-the-token"}),
        ("GET", f"{management}/models", {"Authorization": f"Bearer {torchserve.keys['inference']}"}),
    ]
    for method, url, headers in attempts:
        r = requests.request(method, url, headers=headers, data=b'{"data": [[[0.5]]]}', timeout=30)
        # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException
        assert r.status_code in (400, 401, 403), (method, url, headers.keys(), r.status_code, r.text[:200])
        assert "Token Authorization failed" in r.text, r.text[:200]
    # the same calls with the right token do work, so the refusals above are the token's doing
    assert requests.get(f"{inference}/ping", headers=torchserve.headers(), timeout=30).status_code == 200
    assert requests.get(f"{management}/models", headers=torchserve.headers("management"), timeout=30).status_code == 200


@pytest.mark.server
def test_registering_a_model_by_url_is_refused(torchserve):
    for url in ("https://download.pytorch.org/models/resnet18.mar", "file:///etc/passwd", "encoder.mar"):
        r = requests.post(f"{torchserve.management_url}/models", params={"url": url, "model_name": "intruder"},
                          headers=torchserve.headers("management"), timeout=60)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text[:300])
        assert "model api" in r.text.lower() or "not allowed" in r.text.lower(), r.text[:300]
    r = requests.delete(f"{torchserve.management_url}/models/encoder", headers=torchserve.headers("management"),
                        timeout=60)
    assert 400 <= r.status_code < 500, r.text[:300]  # unregistering is the model API too
    models = requests.get(f"{torchserve.management_url}/models", headers=torchserve.headers("management"),
                          timeout=30).json()["models"]
    assert [m["modelName"] for m in models] == ["encoder"]


def server_listeners(pid: int) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every TCP/UDP socket in LISTEN (or bound UDP) state in the server's process tree."""
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr):
                found.append((proc.pid, c.laddr.ip, c.laddr.port))
    return found


@pytest.mark.server
def test_nothing_listens_beyond_loopback(torchserve):
    torchserve.wait_for_workers("encoder", 1)
    listeners = server_listeners(torchserve.process.pid)
    ports = {port for _, _, port in listeners}
    assert set(torchserve.ports.values()) <= ports, (torchserve.ports, listeners)  # we did see its sockets
    for pid, ip, port in listeners:
        assert ipaddress.ip_address(ip).is_loopback or ip in LOOPBACK, f"pid {pid} listens on {ip}:{port}"


@pytest.mark.server
def test_workers_run_with_the_spin_limit(torchserve):
    torchserve.wait_for_workers("encoder", 1)
    name, value = SPIN_LIMIT
    pids = [int(w["pid"]) for w in workers(torchserve, "encoder") if w.get("pid")]
    assert pids and all(psutil.Process(pid).environ().get(name) == value for pid in pids)
