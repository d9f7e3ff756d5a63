"""The Dockerfiles (which cannot be built here: no container daemon, no registry) agree with what is
tested: they install with the script CI runs and nothing else, and run exactly the Deployment's
command, user, working directory and ports."""
from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from image_embedder_testkit.checkout import REPO

IMAGES = {"deploy/Dockerfile": "deploy/k8s/deployment-cpu.yaml", "deploy/Dockerfile.cuda": "deploy/k8s/deployment-gpu.yaml"}


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    with open(os.path.join(REPO, path)) as f:
        text = re.sub(r"\\\n\s*", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile,manifest", IMAGES.items())
def test_image_matches_its_deployment(dockerfile, manifest):
    steps = instructions(dockerfile)
    with open(os.path.join(REPO, manifest)) as f:
        pod = yaml.safe_load(f)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    runs = [args for op, args in steps if op == "RUN"]
    assert len(runs) == 1 and runs[0].startswith("bash scripts/setup_env.sh")
    assert "pip" not in runs[0]  # every package comes from requirements.txt through the CI script
    assert json.loads([args for op, args in steps if op == "CMD"][-1]) == container["command"]
    assert [args for op, args in steps if op == "USER"][-1] == str(pod["securityContext"]["runAsUser"])
    assert [args for op, args in steps if op == "WORKDIR"][-1] == container["workingDir"]
    exposed = {int(port) for op, args in steps if op == "EXPOSE" for port in args.split()}
    assert exposed == {port["containerPort"] for port in container["ports"]}
    assert container["command"][0].startswith("/app/.venv/bin/")  # where setup_env.sh puts the venv (WORKDIR /app)
    env = " ".join(args for op, args in steps if op == "ENV")
    assert ("download.pytorch.org/whl/cpu" in env) == dockerfile.endswith("Dockerfile")


def test_build_context_leaves_out_local_state():
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "out", "model_store/*.mar", "key_file.json"} <= ignored
