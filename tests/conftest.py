"""Shared fixtures: the example's files and archive, archive building, in-process and real TorchServe.

Helpers the tests import live in image_embedder_testkit (testkit/), not here."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from image_embedder_testkit.background import JOBS, Lane
from image_embedder_testkit.checkout import EXAMPLE_DIR
from image_embedder_testkit.example_server import private_example_server
from image_embedder_testkit.feature_server import start_feature_server
from image_embedder_testkit.key_stream import KeyStream
from image_embedder_testkit.reference import load_reference_model
from image_embedder_testkit.ts_inprocess import InProcessModel
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import ArchiveSpec, build_archive


@pytest.fixture(scope="session")
def example_files(tmp_path_factory) -> dict:
    """The original README's CustomModel and a state_dict made by its own __main__ block."""
    folder = tmp_path_factory.mktemp("example")
    shutil.copy(os.path.join(EXAMPLE_DIR, "model.py"), folder / "model.py")
    weights = folder / "model_state_dict.pth"
    subprocess.run([sys.executable, str(folder / "model.py"), str(weights)], check=True, capture_output=True)
    return {"model_file": str(folder / "model.py"), "state_dict": str(weights), "class": "CustomModel"}


@pytest.fixture(scope="session")
def example_model(example_files) -> torch.nn.Module:
    return load_reference_model(example_files["model_file"], example_files["class"], example_files["state_dict"])


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def example_archive(example_files, model_store) -> str:
    return build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], example_files["state_dict"],
                         "conv1", input_shape=[3, 224, 224], name="encoder", export_path=model_store), quiet=True)


@pytest.fixture(scope="session")
def example_service(example_archive) -> InProcessModel:
    return InProcessModel(example_archive)


@pytest.fixture(scope="session")
def digits_archives(tmp_path_factory) -> dict:
    """examples/digits trained once (seeded) and built three ways, calibrated on its training images
    and L2-normalized: `digits` (64-d), `digits-white` (whitened to 16, power 0.5) and
    `digits-white-full` (power 1). Keys: the three archives' paths, `folder` (weights, training .npy)
    `store` (the model store holding the archives) and `accuracy` (held-out classification)."""
    sys.path.insert(0, os.path.join(EXAMPLE_DIR, "..", "digits"))
    from train import train

    folder = tmp_path_factory.mktemp("digits")
    accuracy = train(str(folder))
    store = folder / "model_store"
    variants = {"digits": {}, "digits-white": {"whiten": 16, "whiten_power": 0.5}, "digits-white-full": {"whiten": 16}}
    archives = {name: build_archive(ArchiveSpec(
        os.path.join(EXAMPLE_DIR, "..", "digits", "model.py"), "DigitsNet", str(folder / "digits.pth"), "embedding",
        input_shape=[1, 8, 8], name=name, export_path=str(store), calibration=str(folder / "digits-train.npy"),
        settings={"normalize": True, "max_images_per_request": 2048}, **extra), quiet=True)
        for name, extra in variants.items()}
    return {**archives, "folder": folder, "store": store, "accuracy": accuracy}


@pytest.fixture(scope="session")
def torchserve(model_store, example_archive):
    """One real TorchServe for the session, serving the example as `encoder` (token auth on)."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    server = TorchServe(model_store, "encoder=encoder.mar")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def feature_torchserve(example_files, tmp_path_factory):
    """One real TorchServe serving images, multi and chlast (image_embedder_testkit.feature_server)."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    server = start_feature_server(example_files, str(tmp_path_factory.mktemp("feature_store")))
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def short_expiry_server(example_archive, tmp_path_factory):
    """The shipped config with token_expiration_min=1 (tests/test_tokens.py)."""
    server = private_example_server(example_archive, str(tmp_path_factory.mktemp("token_store")),
                                    {"token_expiration_min": 1}, timeout=50)  # within the keys' first minute
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def key_stream(short_expiry_server):
    """A documented client streaming its images across two key expiries (135 s); started first when its
    test is selected (start_background_proofs)."""
    stream = KeyStream(short_expiry_server, np.random.default_rng(70).normal(size=(4, 3, 224, 224)).astype(np.float32))
    yield stream
    stream.stop()


def joins_a_background_proof(item: pytest.Item) -> bool:
    return item.get_closest_marker("background") is not None or "key_stream" in item.fixturenames


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that join a background proof run last, in their order: by then their proof has had the
    rest of the suite's time to run."""
    items[:] = [i for i in items if not joins_a_background_proof(i)] + [i for i in items if joins_a_background_proof(i)]


@pytest.fixture(scope="session", autouse=True)
def start_background_proofs(request, tmp_path_factory):
    """Start the slow proofs that mostly wait or run alone, before the first test, so that their time
    overlaps the suite's instead of adding to it; their tests join them and assert (only when selected).
    - the one-minute keys' stream (its own threads, three requests a second for 135 s);
    - the jobs of tests marked @pytest.mark.background(name), one at a time in a lane of their own
      (image_embedder_testkit.background)."""
    items = request.session.items
    if any("key_stream" in item.fixturenames for item in items):
        request.getfixturevalue("key_stream")
    lane = Lane()
    for name in dict.fromkeys(m.args[0] for item in items for m in item.iter_markers("background")):
        JOBS[name].start(lane, str(tmp_path_factory.mktemp(name.replace(" ", "_"))))
    yield
    lane.close()
