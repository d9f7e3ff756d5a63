"""Weights that can't be trusted: pickled code is refused at build and load time and never runs;
safetensors weights serve end to end; a weights file changed after the build fails its sha256 check.

Every hostile weights file here would create a file when unpickled; each test first proves the
payload is live (unpickling a copy does create its file), then that ours never ran it.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests
import torch
import yaml
from safetensors.torch import save_file

from image_embedder.encoder import ImageEncoder
from image_embedder.errors import ConfigError
from image_embedder.settings import EncoderSettings
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import ArchiveSpec, build_archive

BUILD_MAR = os.path.join(REPO, "scripts", "build_mar.py")


class LeaveFile:
    """Unpickling this creates `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_weights(folder, example_state: dict, kind: str, evidence: str) -> str:
    """A weights file that runs code when unpickled: a real torch.save archive, or a bare pickle."""
    state = dict(example_state)
    state["conv1.weight"] = LeaveFile(evidence)  # looks like a state_dict with one odd value
    path = os.path.join(folder, f"hostile_{kind}.pth")
    if kind == "torch_save":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    return path


def assert_live(path: str, tmp_path, kind: str) -> None:
    """Unpickling a copy of the payload (aimed elsewhere) does leave its file: the payload is real."""
    control = str(tmp_path / f"control_{kind}.txt")
    folder = tmp_path / "control"
    folder.mkdir(exist_ok=True)
    copy = hostile_weights(str(folder), {}, kind, control)
    if kind == "torch_save":
        torch.load(copy, weights_only=False)
    else:
        with open(copy, "rb") as f:
            pickle.load(f)
    assert os.path.exists(control)
    os.remove(copy)


@pytest.fixture(scope="module")
def example_state(example_files) -> dict:
    return torch.load(example_files["state_dict"], weights_only=True)


@pytest.mark.parametrize("kind", ["torch_save", "bare_pickle"])
def test_pickled_code_in_weights_is_refused_at_build_time(example_files, example_state, kind, tmp_path):
    evidence = str(tmp_path / "ran_at_build.txt")
    weights = hostile_weights(str(tmp_path), example_state, kind, evidence)
    assert_live(weights, tmp_path, kind)
    store = tmp_path / "store"
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_archive(ArchiveSpec(example_files["model_file"], "CustomModel", weights, "conv1",
                      name="hostile", export_path=str(store)), quiet=True)
    assert not os.path.exists(evidence), "building unpickled the weights"
    assert not (store / "hostile.mar").exists()
    if kind == "torch_save":  # and the CLI says so, with exit status 2
        out = subprocess.run([sys.executable, BUILD_MAR, "--model-file", example_files["model_file"],
                              "--model-class", "CustomModel", "--state-dict", weights, "--layer", "conv1",
                              "--name", "hostile", "--export-path", str(store)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "was refused" in out.stderr and "objects are never unpickled" in out.stderr, out.stderr
        assert not os.path.exists(evidence)
        assert not (store / "hostile.mar").exists()


@pytest.mark.parametrize("kind", ["torch_save", "bare_pickle"])
def test_pickled_code_in_weights_is_refused_at_load_time(example_files, example_state, kind, tmp_path):
    """An archive made by hand (no build script, no sha256) that ships hostile weights."""
    evidence = str(tmp_path / "ran_at_load.txt")
    weights = hostile_weights(str(tmp_path), example_state, kind, evidence)
    shutil.copy(example_files["model_file"], tmp_path / "model.py")
    settings = EncoderSettings.from_mapping({
        "model_definition_file": "model.py", "model_class_name": "CustomModel",
        "model_state_dict_path": os.path.basename(weights), "layer_name": "conv1"})
    with pytest.raises(ConfigError) as info:
        ImageEncoder(settings, str(tmp_path))
    message = str(info.value)
    assert os.path.basename(weights) in message and "weights_only=True" in message
    assert not os.path.exists(evidence), "loading unpickled the weights"


def rewrite_mar(mar: str, out: str, replace: dict[str, bytes]) -> str:
    """A copy of an archive with some members' bytes replaced."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item, replace.get(item.filename, src.read(item.filename)))
    return out


def model_config(mar: str) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def test_hostile_weights_in_an_archive_without_sha256_are_refused_by_the_worker(
        example_archive, example_state, tmp_path):
    evidence = str(tmp_path / "ran_in_worker.txt")
    weights = hostile_weights(str(tmp_path), example_state, "torch_save", evidence)
    config = model_config(example_archive)
    config["handler"].pop("sha256")
    name = config["handler"]["model_state_dict_path"]
    with open(weights, "rb") as f:
        hostile = f.read()
    mar = rewrite_mar(example_archive, str(tmp_path / "hostile.mar"),
                      {name: hostile, "model-config.yaml": yaml.safe_dump(config).encode()})
    with pytest.raises(Exception, match="weights_only=True") as info:
        InProcessModel(mar)
    assert type(info.value).__name__ == "ConfigError"
    assert not os.path.exists(evidence)


def tampered_archive(example_archive: str, example_state: dict, out: str) -> str:
    """The example archive with its weights changed after the build (the sha256 setting left as built)."""
    config = model_config(example_archive)
    state = {k: v.clone() for k, v in example_state.items()}
    state["conv1.bias"] += 0.01
    buf = out + ".pth"
    torch.save(state, buf)
    with open(buf, "rb") as f:
        return rewrite_mar(example_archive, out, {config["handler"]["model_state_dict_path"]: f.read()})


def test_build_writes_sha256_of_the_weights(example_archive, example_files):
    import hashlib

    with open(example_files["state_dict"], "rb") as f:
        assert model_config(example_archive)["handler"]["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_tampered_archive_refuses_to_start_in_process(example_archive, example_state, tmp_path):
    mar = tampered_archive(example_archive, example_state, str(tmp_path / "tampered.mar"))
    with pytest.raises(Exception, match="has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}: the archive was altered"):
        InProcessModel(mar)


# -- safetensors, end to end on a real TorchServe (which also refuses the tampered archive) ------------

@pytest.fixture(scope="module")
def safetensors_store(example_files, example_state, example_archive, tmp_path_factory) -> str:
    store = tmp_path_factory.mktemp("st_store")
    weights = store / "model.safetensors"
    save_file({k: v.contiguous() for k, v in example_state.items()}, str(weights))
    out = subprocess.run([sys.executable, BUILD_MAR, "--model-file", example_files["model_file"],
                          "--model-class", "CustomModel", "--state-dict", str(weights), "--layer", "conv1",
                          "--input-shape", "3,224,224", "--name", "st", "--export-path", str(store)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "embedding size 10" in out.stderr
    os.remove(weights)  # the archive is self-contained
    tampered_archive(example_archive, example_state, str(store / "tampered.mar"))
    return str(store)


def test_safetensors_archive_ships_safetensors(safetensors_store):
    mar = os.path.join(safetensors_store, "st.mar")
    config = model_config(mar)["handler"]
    assert config["model_state_dict_path"] == "model.safetensors" and len(config["sha256"]) == 64
    with zipfile.ZipFile(mar) as z:
        assert "model.safetensors" in z.namelist()


@pytest.fixture(scope="module")
def weights_server(safetensors_store):
    if not java_available():
        pytest.fail("TorchServe needs Java 17")
    # The model API is on here only so the tampered archive's registration can be tried.
    server = TorchServe(safetensors_store, "st=st.mar", overrides={"enable_model_api": "true"})
    server.start(timeout=240)
    yield server
    server.cleanup()


@pytest.mark.server
def test_safetensors_weights_serve_reference_embeddings(weights_server, example_model):
    images = np.random.default_rng(11).random((3, 3, 224, 224), dtype=np.float32)
    r = requests.post(f"{weights_server.inference_url}/predictions/st", data=npy_bytes(images),
                      headers=weights_server.headers(**{"Content-Type": "application/x-npy"}), timeout=120)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["embeddings"], np.float32)
    np.testing.assert_allclose(got, reference_embeddings(example_model, "conv1", images), atol=1e-5)


@pytest.mark.server
def test_real_server_refuses_to_register_a_tampered_archive(weights_server):
    r = requests.post(f"{weights_server.management_url}/models",
                      params={"url": "tampered.mar", "initial_workers": 1, "synchronous": "true"},
                      headers=weights_server.headers("management"), timeout=180)
    assert r.status_code >= 400, r.text
    status = requests.get(f"{weights_server.management_url}/models/tampered",
                          headers=weights_server.headers("management"), timeout=30)
    if status.status_code == 200:  # registered but never ready
        assert not any(w.get("status") == "READY" for w in status.json()[0].get("workers", []))
    with open(os.path.join(weights_server.workdir, "logs", "model_log.log"), errors="replace") as f:
        assert "the archive was altered" in f.read()
    requests.delete(f"{weights_server.management_url}/models/tampered",
                    headers=weights_server.headers("management"), timeout=60)
