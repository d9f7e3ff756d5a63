"""Every manifest under deploy/ checked against the real definitions, offline:

- Kubernetes objects: the Kubernetes 1.37 JSON schemas that kubernetes-validate ships, strict
  (an unknown or misspelt field fails);
- the InferenceServices: KServe 0.21.0's own SDK models (generated from KServe's OpenAPI spec): every
  field must be one the model declares, recursively, and the Kubernetes types inside (resources,
  env, containers, metadata) go through the Kubernetes schemas again. The kserve wheel is installed
  with --no-deps (its server dependencies are heavy) and only kserve.models is imported;
- the objects agree with each other (names, labels, ports, mounts, probe script paths).
"""
from __future__ import annotations

import glob
import importlib
import importlib.metadata
import json
import os
import sys
import types

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from image_embedder_testkit.checkout import REPO

K8S_VERSION = "1.37.0"
DEPLOY = os.path.join(REPO, "deploy")
# protocolVersions of KServe's kserve-torchserve ClusterServingRuntime (config/runtimes/kserve-torchserve.yaml)
TORCHSERVE_RUNTIME_PROTOCOLS = ("v1", "v2", "grpc-v2")


def manifests(folder: str) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, folder, "*.yaml"))):
        with open(path) as f:
            found += [(os.path.relpath(path, REPO), doc) for doc in yaml.safe_load_all(f) if doc]
    return found


K8S = manifests("k8s")
KSERVE = manifests("kserve")


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in K8S if doc["kind"] == kind]


# -- Kubernetes -------------------------------------------------------------------------------
@pytest.mark.parametrize("path,doc", K8S, ids=[f"{p}:{d['kind']}" for p, d in K8S])
def test_kubernetes_schema(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_can_fail():
    deployment = json.loads(json.dumps(by_kind("Deployment")[0]))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


_K8S_DIR = f"kubernetes-json-schema/v{K8S_VERSION.rsplit('.', 1)[0]}.0-local-strict"


def _schema(name: str) -> dict:
    return kubernetes_validate.utils.schema_contents(f"{_K8S_DIR}/{name}", K8S_VERSION)


def validate_k8s_fragment(value, sdk_type: str, where: str) -> None:
    """A Kubernetes type named in KServe's SDK (V1Container, V1ObjectMeta, ...) against its schema."""
    name = sdk_type[2:].lower()  # V1ResourceRequirements -> resourcerequirements
    for filename in (f"{name}-v1.json", f"{name}-meta-v1.json"):
        try:
            schema = _schema(filename)
            break
        except FileNotFoundError:
            continue
    else:
        raise AssertionError(f"{where}: no Kubernetes schema for {sdk_type}")
    registry = referencing.Resource.from_contents(_schema("_definitions.json")) @ referencing.Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(value)


# -- KServe -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kserve_models():
    """kserve.models from the installed kserve 0.21.0, without running kserve/__init__ (server deps)."""
    try:
        dist = importlib.metadata.distribution("kserve")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("pip install --no-deps -r deploy/requirements-kserve.txt (scripts/setup_env.sh does)")
    assert dist.version == "0.21.0"
    saved = {name: mod for name, mod in sys.modules.items() if name == "kserve" or name.startswith("kserve.")}
    package = types.ModuleType("kserve")
    package.__path__ = [str(dist.locate_file("kserve"))]
    sys.modules["kserve"] = package
    try:
        return importlib.import_module("kserve.models")
    finally:
        for name in [n for n in sys.modules if n == "kserve" or n.startswith("kserve.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def check_kserve(value, sdk_type: str, models, where: str) -> None:
    """`value` against the SDK type `sdk_type` ('V1beta1ModelSpec', 'list[V1EnvVar]', 'dict(str, str)', 'int', ...)."""
    if sdk_type.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
        for i, item in enumerate(value):
            check_kserve(item, sdk_type[5:-1], models, f"{where}[{i}]")
    elif sdk_type.startswith("dict("):
        assert isinstance(value, dict), f"{where}: expected a mapping, got {value!r}"
        item_type = sdk_type[5:-1].split(",", 1)[1].strip()
        for key, item in value.items():
            check_kserve(item, item_type, models, f"{where}.{key}")
    elif sdk_type.startswith(("V1alpha1", "V1beta1")):
        cls = getattr(models, sdk_type)
        assert isinstance(value, dict), f"{where}: expected an object ({sdk_type}), got {value!r}"
        fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
        unknown = sorted(set(value) - set(fields))
        assert not unknown, f"{where}: {unknown} not fields of KServe's {sdk_type}; valid: {sorted(fields)}"
        for key, item in value.items():
            check_kserve(item, cls.openapi_types[fields[key]], models, f"{where}.{key}")
        cls(**{fields[k]: v for k, v in value.items()})  # the SDK's own setters (enums, required values)
    elif sdk_type.startswith("V1"):
        validate_k8s_fragment(value, sdk_type, where)
    else:
        python_type = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}[sdk_type]
        assert isinstance(value, python_type), f"{where}: expected {sdk_type}, got {value!r}"


@pytest.mark.parametrize("path,doc", KSERVE, ids=[p for p, _ in KSERVE])
def test_inference_service_against_kserve_sdk(path, doc, kserve_models):
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    check_kserve(doc, "V1beta1InferenceService", kserve_models, path)
    model = doc["spec"]["predictor"]["model"]
    assert model["runtime"] == "kserve-torchserve" and model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] in TORCHSERVE_RUNTIME_PROTOCOLS
    # no serviceEnvelope label: KServe then sets TS_SERVICE_ENVELOPE="" (tests/test_deploy_kserve.py)
    assert "serviceEnvelope" not in (doc["metadata"].get("labels") or {})


def test_the_kserve_check_can_fail(kserve_models):
    _, doc = KSERVE[0]
    broken = json.loads(json.dumps(doc))
    broken["spec"]["predictor"]["model"]["storageURI"] = broken["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(AssertionError, match="storageURI"):
        check_kserve(broken, "V1beta1InferenceService", kserve_models, "isvc")
    broken = json.loads(json.dumps(doc))
    broken["spec"]["predictor"]["model"]["resources"]["limits"]["gpu"] = {"count": 1}
    with pytest.raises(jsonschema.ValidationError):
        check_kserve(broken, "V1beta1InferenceService", kserve_models, "isvc")


# -- the objects agree with each other ----------------------------------------------------------
@pytest.mark.parametrize("deployment", by_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_deployment_wiring(deployment):
    [service] = by_kind("Service")
    [config_map] = by_kind("ConfigMap")
    [claim] = by_kind("PersistentVolumeClaim")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port_names)
    props = dict(line.split("=", 1) for line in config_map["data"]["config.properties"].splitlines()
                 if "=" in line and not line.startswith("#"))
    assert props["inference_address"].endswith(f":{port_names['inference']}")
    assert props["metrics_address"].endswith(f":{port_names['metrics']}")
    assert props["management_address"].startswith("http://127.0.0.1:")  # never exposed
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/config"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    command = container["command"]
    assert command[command.index("--ts-config") + 1] == "/config/config.properties"
    assert props["model_store"] == command[command.index("--model-store") + 1] == "/models/model-store"
    with open(os.path.join(REPO, "config.properties")) as f:  # one key lifetime, whichever way it is served
        shipped = dict(line.strip().split("=", 1) for line in f if "=" in line and not line.startswith("#"))
    assert props["token_expiration_min"] == shipped["token_expiration_min"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        exec_command = container[probe]["exec"]["command"]
        assert exec_command[1] == "/app/deploy/probe.py" and os.path.exists(os.path.join(REPO, "deploy", "probe.py"))
        key_file = exec_command[exec_command.index("--key-file") + 1]
        assert os.path.dirname(key_file) == container["workingDir"]  # TorchServe writes it to its cwd
    requests = container["resources"]["requests"]
    assert ("nvidia.com/gpu" in requests) == deployment["metadata"]["name"].endswith("-gpu")
    # Guaranteed QoS (whole cores under the static CPU manager policy): requests = limits, integer CPUs
    assert requests == container["resources"]["limits"] and float(requests["cpu"]).is_integer()


def test_hpa_targets_a_deployment():
    names = {d["metadata"]["name"] for d in by_kind("Deployment")}
    for hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in names
