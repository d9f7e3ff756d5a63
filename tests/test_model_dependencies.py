"""Models that import third-party packages.

- The build carries the model's requirements as torch-model-archiver does (`--requirements-file`).
- A package missing where the build runs stops it, naming the package and both fixes; a file left out
  of --extra-files is named as such instead.
- einops, installed by the project's own steps, serves from a real TorchServe like any model.
- On a server whose Python lacks einops the model's workers log the same message and never become
  READY: the readiness probe fails, describe is never answered, /ping turns 500 once TorchServe stops
  retrying; the other model on that server answers all along.
- TorchServe's `install_py_dep_per_model=true` pip-installs an archive's requirements at model load: a
  model importing a package the venv lacks (termcolor) loads and answers. It needs the package index,
  and is skipped, saying why, where pip cannot reach it.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections import OrderedDict
from typing import Optional

import numpy as np
import pytest
import requests
import torch

from image_embedder.errors import ConfigError
from image_embedder.loading import import_model_file
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import REPO, TEST_MODELS
from image_embedder_testkit.management import workers
from image_embedder_testkit.reference import load_reference_model, reference_embeddings
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import ArchiveSpec, build_archive, main

EINOPS_MODEL = os.path.join(TEST_MODELS, "einops_net.py")
EINOPS_REQUIREMENTS = os.path.join(TEST_MODELS, "einops_requirements.txt")
TERMCOLOR_MODEL = os.path.join(TEST_MODELS, "termcolor_net.py")
TERMCOLOR = "termcolor==3.3.0"  # tiny, pure Python, no dependencies, not a requirement of this project
BUILD_MAR = os.path.join(REPO, "scripts", "build_mar.py")
PROBE = os.path.join(REPO, "deploy", "probe.py")
FIXES = ("pip install einops", "--requirements-file", "install_py_dep_per_model=true",
         "docs/usage.md#models-with-dependencies")


def einops_cli(weights: str, out, *more: str) -> list[str]:
    return ["--model-file", EINOPS_MODEL, "--model-class", "EinopsNet", "--state-dict", weights, "--layer", "mix",
            "--input-shape", "3,16,16", "--name", "einops_net", "--export-path", str(out), *more]


@pytest.fixture(scope="module")
def einops_weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("einops") / "einops_net.pth")
    subprocess.run([sys.executable, EINOPS_MODEL, path], check=True, capture_output=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def einops_archive(einops_weights, tmp_path_factory) -> str:
    """EinopsNet, layer `mix`, with weights and no requirements file (the servers have einops or never will)."""
    return build_archive(ArchiveSpec(EINOPS_MODEL, "EinopsNet", einops_weights, "mix", input_shape=[3, 16, 16],
                                     name="einops_net", export_path=str(tmp_path_factory.mktemp("einops_store"))),
                         quiet=True)


def test_the_einops_pin_of_the_test_model_is_the_projects():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        pins = {line.split("==")[0]: line.strip() for line in f if "==" in line and not line.startswith("#")}
    with open(EINOPS_REQUIREMENTS) as f:
        assert f.read().split() == [pins["einops"]]


# -- the build ----------------------------------------------------------------------------------------

def archiver_manifest_and_names(tmp_path) -> tuple[dict, set]:
    """What torch-model-archiver itself makes of a --requirements-file: the manifest and the members."""
    tmp_path.mkdir()
    handler = tmp_path / "h.py"
    handler.write_text("def handle(data, context):\n    return data\n")
    archiver = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
    subprocess.run([archiver, "--model-name", "ref_reqs_q7", "--version", "1.0", "--handler", str(handler),
                    "--requirements-file", EINOPS_REQUIREMENTS, "--export-path", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    with zipfile.ZipFile(tmp_path / "ref_reqs_q7.mar") as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"], set(z.namelist())


def test_requirements_file_is_carried_as_torch_model_archiver_does(einops_weights, tmp_path, capsys):
    reference, reference_names = archiver_manifest_and_names(tmp_path / "archiver")
    assert main(einops_cli(einops_weights, tmp_path / "store", "--requirements-file", EINOPS_REQUIREMENTS)) == 0
    assert "install_py_dep_per_model=true" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "store" / "einops_net.mar") as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        assert manifest["requirementsFile"] == reference["requirementsFile"] == "einops_requirements.txt"
        assert manifest["requirementsFile"] in z.namelist() and manifest["requirementsFile"] in reference_names
        with open(EINOPS_REQUIREMENTS, "rb") as f:
            assert z.read(manifest["requirementsFile"]) == f.read()


def test_without_requirements_file_the_manifest_names_none(einops_archive):
    with zipfile.ZipFile(einops_archive) as z:
        assert "requirementsFile" not in json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]


def test_a_requirements_file_that_does_not_exist_fails_before_anything_is_written(einops_weights, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(einops_cli(einops_weights, out, "--requirements-file", str(tmp_path / "nope.txt"))) == 2
    assert f"error: {str(tmp_path / 'nope.txt')!r} does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_package_stops_the_build_naming_it_and_both_fixes(einops_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "einops", None)  # `import einops` now fails as if it were not installed
    out = tmp_path / "store"
    assert main(einops_cli(einops_weights, out, "--requirements-file", EINOPS_REQUIREMENTS)) == 2
    err = capsys.readouterr().err
    assert f"error: importing model definition file {EINOPS_MODEL!r} needs module 'einops'" in err
    for fix in FIXES:
        assert fix in err, fix
    assert "Traceback" not in err and "mar-build-" not in err
    assert not out.exists()


def test_a_file_left_out_of_extra_files_is_named_as_such(tmp_path, capsys):
    helper = f"parts_{uuid.uuid4().hex[:12]}"  # a fresh name: no folder an earlier test put on sys.path has it
    (tmp_path / f"{helper}.py").write_text("import torch.nn as nn\n\nStem = nn.Conv2d\n")
    (tmp_path / "user_model.py").write_text(
        f"import torch.nn as nn\nfrom {helper} import Stem\n\n\n"
        "class UserNet(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.stem = Stem(3, 4, 3)\n\n    def forward(self, x):\n        return self.stem(x)\n")
    out = tmp_path / "store"
    assert main(["--model-file", str(tmp_path / "user_model.py"), "--model-class", "UserNet", "--layer", "stem",
                 "--export-path", str(out)]) == 2
    err = capsys.readouterr().err
    sibling = str(tmp_path / f"{helper}.py")
    assert f"imports {helper!r}, and {sibling!r} lies beside it but is not in the archive" in err
    assert f"--extra-files {sibling}" in err and "pip install" not in err
    assert not out.exists()
    assert main(["--model-file", str(tmp_path / "user_model.py"), "--model-class", "UserNet", "--layer", "stem",
                 "--extra-files", sibling, "--export-path", str(out)]) == 0  # the fix it names works


@pytest.mark.parametrize("statement, missing, pip_name", [
    ("import absent_pkg_q7x", "absent_pkg_q7x", "absent_pkg_q7x"),
    ("from absent_pkg_q7x.layers import Block", "absent_pkg_q7x", "absent_pkg_q7x"),
    ("import json.absent_submodule_q7x", "json.absent_submodule_q7x", "json"),
])
def test_the_engine_names_the_missing_module(tmp_path, statement, missing, pip_name):
    model = tmp_path / "model.py"
    model.write_text(f"import torch\n{statement}\n")
    with pytest.raises(ConfigError) as info:
        import_model_file(str(model))
    message = str(info.value)
    assert f"needs module {missing!r}, which cannot be found here" in message
    assert f"pip install {pip_name}" in message and "--extra-files" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_the_server_image_can_bake_a_models_requirements_in():
    """Both Dockerfiles take MODEL_REQUIREMENTS as a build argument before their one RUN (a Docker ARG
    reaches a RUN's environment only once declared), which setup_env.sh reads (next test)."""
    for name in ("Dockerfile", "Dockerfile.cuda"):
        with open(os.path.join(REPO, "deploy", name)) as f:
            steps = [line.split() for line in f if line.strip() and not line.lstrip().startswith("#")]
        assert ["ARG", "MODEL_REQUIREMENTS="] in steps, name
        assert steps.index(["ARG", "MODEL_REQUIREMENTS="]) < [step[0] for step in steps].index("RUN"), name


def test_setup_env_installs_model_requirements_into_the_venv(tmp_path):
    """scripts/setup_env.sh with MODEL_REQUIREMENTS, against a stand-in venv that records what pip is asked."""
    for rel in ("scripts/setup_env.sh", "requirements-serve.txt", "requirements.txt", "pyproject.toml", "client/pyproject.toml"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(REPO, rel), tmp_path / rel)
    (tmp_path / "model-requirements.txt").write_text("einops==0.8.2\n")
    bin_dir, venv_bin = tmp_path / "fakebin", tmp_path / ".venv" / "bin"
    for folder in (bin_dir, venv_bin):
        folder.mkdir(parents=True)
    stand_ins = {
        bin_dir / "java": "#!/bin/sh\necho 'openjdk version \"17.0.9\" 2023-10-17' >&2\n",
        venv_bin / "python": f'#!/bin/sh\necho "$*" >> {tmp_path / "pip.log"}\n'
                             '[ "$3" = show ] && echo "Version: 0.21.0"\nexit 0\n',
    }
    for path, text in stand_ins.items():
        path.write_text(text)
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               MODEL_REQUIREMENTS="model-requirements.txt")

    def run() -> list[str]:
        (tmp_path / "pip.log").write_text("")
        subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tmp_path, env=env, check=True, timeout=60)
        return [line for line in (tmp_path / "pip.log").read_text().splitlines() if " install " in line]

    installs = run()
    assert installs[0] == "-m pip install -q -r requirements.txt"
    assert installs[-1] == "-m pip install -q -r model-requirements.txt"
    assert run() == []  # idempotent: nothing changed, nothing installed
    (tmp_path / "model-requirements.txt").write_text("einops==0.8.2\ntermcolor==3.3.0\n")
    assert run()[-1] == "-m pip install -q -r model-requirements.txt"  # a changed model requirement installs again


# -- a server whose Python lacks einops ---------------------------------------------------------------

def with_path(folder: str) -> str:
    """PYTHONPATH with `folder` first."""
    return os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)


def wait_for_log(server: TorchServe, text: str, timeout: float = 180.0) -> str:
    """The workers' log once it holds `text`."""
    path = os.path.join(server.workdir, "logs", "model_log.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                log = f.read()
            if text in log:
                return log
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in the workers' log after {timeout} s:\n{server.log_tail()}")


RETRY_SECONDS = 5  # how long TorchServe retries einops_net's failing worker (maxRetryTimeoutInSec, default 300)


@pytest.fixture(scope="module")
def server_without_einops(example_archive, einops_weights, tmp_path_factory):
    """The example as `encoder` and EinopsNet as `einops_net`, on a TorchServe whose Python cannot import
    einops: a sitecustomize on its PYTHONPATH blocks it, in the frontend and in every worker."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    store = tmp_path_factory.mktemp("no_einops_store")
    shutil.copy(example_archive, store / "encoder.mar")
    config = store.parent / "no_einops_config" / "model-config.yaml"
    config.parent.mkdir()
    config.write_text(f"maxRetryTimeoutInSec: {RETRY_SECONDS}\n")
    build_archive(ArchiveSpec(EINOPS_MODEL, "EinopsNet", einops_weights, "mix", config_file=str(config),
                              name="einops_net", export_path=str(store)), quiet=True)
    shim = tmp_path_factory.mktemp("no_einops_python")
    (shim / "sitecustomize.py").write_text('import sys\n\nsys.modules["einops"] = None  # as if not installed\n')
    env = {"PYTHONPATH": with_path(str(shim))}
    check = subprocess.run([sys.executable, "-c", "import einops"], env=dict(os.environ, **env),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "einops" in check.stderr, "the shim did not hide einops"
    server = TorchServe(str(store), "encoder=encoder.mar,einops_net=einops_net.mar", env=env,
                        overrides={"default_workers_per_model": 1})  # one failing worker retrying, not one per core
    server.start(timeout=240, healthy=False)  # once einops_net's retries end, /ping is Unhealthy
    try:
        server.wait_for_workers("encoder", timeout=240)
    except BaseException:
        server.cleanup()
        raise
    yield server
    server.cleanup()


@pytest.mark.server
def test_a_worker_without_the_package_logs_the_fixes_and_never_becomes_ready(server_without_einops):
    server = server_without_einops
    log = wait_for_log(server, "needs module 'einops'")
    for fix in FIXES[1:]:  # `pip install einops` is there too; the server-side fixes matter here
        assert fix in log, fix
    assert not any(w.get("status") == "READY" for w in workers(server, "einops_net"))
    # the readiness probe needs a READY worker of the model: it fails while TorchServe retries, and after
    probe = subprocess.run([sys.executable, PROBE, "ready", "--url", server.inference_url, "--management-url",
                            server.management_url, "--model", "einops_net",
                            "--key-file", os.path.join(server.workdir, "key_file.json")],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1, probe.stdout
    assert "model einops_net: 0 READY worker(s)" in probe.stderr or "/ping answered 500" in probe.stderr
    try:  # describe is answered by a worker, and none ever loads: TorchServe queues the request
        described = requests.get(f"{server.inference_url}/predictions/einops_net",
                                 headers=server.headers(describe="true"), timeout=3)
        assert described.status_code != 200, described.text
    except requests.Timeout:
        pass
    # TorchServe counts a retrying worker as healthy; once its retries end, /ping says Unhealthy
    deadline = time.monotonic() + RETRY_SECONDS + 120
    ping_url = f"{server.inference_url}/ping"
    while (ping := requests.get(ping_url, headers=server.headers(), timeout=30)).status_code == 200:
        assert time.monotonic() < deadline, "/ping still Healthy long after einops_net's retries ended"
        time.sleep(0.5)
    assert (ping.status_code, ping.json()["status"]) == (500, "Unhealthy")
    assert not any(w.get("status") == "READY" for w in workers(server, "einops_net"))


@pytest.mark.server
def test_the_other_model_on_that_server_still_answers(server_without_einops, example_model):
    images = np.random.default_rng(5).random((2, 3, 224, 224), dtype=np.float32)  # the forward needs 224
    r = requests.post(f"{server_without_einops.inference_url}/predictions/encoder", data=npy_bytes(images),
                      headers=server_without_einops.headers(**{"Content-Type": "application/x-npy"}), timeout=120)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32),
                               reference_embeddings(example_model, "conv1", images), atol=1e-5)


# -- a server with einops, and TorchServe's per-model install ----------------------------------------

def pip_install_into(target: str, requirement: str, timeout: float = 120.0) -> Optional[str]:
    """pip-install `requirement` into `target` only (not the venv), with the pip configuration TorchServe's
    own install will use (PIP_INDEX_URL, pip.conf); None when it worked, else why the index can't be used."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", target, requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`pip install {requirement}` did not finish within {timeout:.0f} s"
    if proc.returncode != 0:
        last = [line.strip() for line in proc.stderr.splitlines() if line.strip()][-3:]
        return f"`pip install {requirement}` failed: {' | '.join(last)[-400:]}"
    return None


@pytest.fixture(scope="module")
def colored_files(tmp_path_factory) -> dict:
    """ColoredNet's weights and a requirements file naming termcolor."""
    folder = tmp_path_factory.mktemp("colored")
    torch.manual_seed(3)
    torch.save({"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}, folder / "colored.pth")
    (folder / "requirements.txt").write_text(TERMCOLOR + "\n")
    return {"weights": str(folder / "colored.pth"), "requirements": str(folder / "requirements.txt")}


@pytest.fixture(scope="module")
def deps_server(einops_archive, colored_files, tmp_path_factory):
    """TorchServe with install_py_dep_per_model=true serving `einops_net` (einops from the venv) and, where
    the package index answers, `colored`: termcolor_net.py built with --requirements-file naming termcolor,
    which only the per-model install gives the server. Yields (server, why colored is absent or None)."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    store = tmp_path_factory.mktemp("deps_store")
    shutil.copy(einops_archive, store / "einops_net.mar")
    models = "einops_net=einops_net.mar"
    build_env = tmp_path_factory.mktemp("termcolor_for_the_build")
    problem = pip_install_into(str(build_env), TERMCOLOR)
    if problem is None:
        # the build imports the model: termcolor importable for the build's process only
        env = dict(os.environ, PYTHONPATH=with_path(str(build_env)))
        built = subprocess.run([sys.executable, BUILD_MAR, "--model-file", TERMCOLOR_MODEL,
                                "--model-class", "ColoredNet", "--state-dict", colored_files["weights"],
                                "--layer", "conv", "--input-shape", "3,8,8",
                                "--requirements-file", colored_files["requirements"],
                                "--name", "colored", "--export-path", str(store)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr
        models += ",colored=colored.mar"
    server = TorchServe(str(store), models,
                        overrides={"install_py_dep_per_model": "true", "default_workers_per_model": 1})
    server.start(timeout=300)  # the frontend pip-installs colored's requirements before it listens
    yield server, problem
    server.cleanup()


@pytest.mark.server
def test_an_einops_model_serves_reference_embeddings(deps_server, einops_weights, tmp_path):
    server, _ = deps_server
    server.wait_for_workers("einops_net", timeout=240)
    # from a copy: the reference loader puts the file's folder on sys.path, and tests/models holds other models
    model = load_reference_model(shutil.copy(EINOPS_MODEL, tmp_path), "EinopsNet", einops_weights)
    images = np.random.default_rng(7).random((3, 3, 16, 24), dtype=np.float32)
    r = requests.post(f"{server.inference_url}/predictions/einops_net", data=npy_bytes(images),
                      headers=server.headers(**{"Content-Type": "application/x-npy"}), timeout=120)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["embeddings"], np.float32)
    assert got.shape == (3, 8)
    np.testing.assert_allclose(got, reference_embeddings(model, "mix", images), atol=1e-5)


@pytest.mark.server
def test_per_model_install_gives_the_server_a_package_its_venv_lacks(deps_server, colored_files):
    server, problem = deps_server
    if problem:
        pytest.skip(f"package index not reachable: {problem}")
    server.wait_for_workers("colored", timeout=240)
    with open(server.log_path, errors="replace") as f:  # the frontend's own log line
        assert "Installed custom pip packages for model colored" in f.read()
    # pip -t put it in the model's own folder under TorchServe's TMPDIR, which the workers import from
    assert glob.glob(os.path.join(server.tmpdir, "models", "*", "termcolor", "__init__.py"))
    images = np.random.default_rng(9).random((2, 3, 8, 8), dtype=np.float32)
    r = requests.post(f"{server.inference_url}/predictions/colored", data=npy_bytes(images),
                      headers=server.headers(**{"Content-Type": "application/x-npy"}), timeout=120)
    assert r.status_code == 200, r.text
    conv = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(3, 4, 3)))  # ColoredNet without termcolor
    conv.load_state_dict(torch.load(colored_files["weights"], weights_only=True))
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32),
                               reference_embeddings(conv.eval(), "conv", images), atol=1e-5)
