"""Shared fixtures: the example's files and archive, archive building, in-process and real TorchServe."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

from typing import Optional

import numpy as np
import pytest
import torch

from image_embedder.tools.build import ArchiveSpec, build_archive
from image_embedder.tools.paths import REPO
from image_embedder.tools.reference import load_reference_model
from image_embedder.tools.ts_server import TorchServe
from ts_inprocess import InProcessModel

EXAMPLE_DIR = os.path.join(REPO, "examples", "custom_model")
MODELS_DIR = os.path.join(os.path.dirname(__file__), "models")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def scripted_reply(handler, status: int, body: bytes = b"", content_type: str = "") -> None:
    """Answer one request of a scripted stand-in server (http.server handler) with `body`."""
    handler.send_response(status)
    if content_type:
        handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def scripted_embeddings(handler, n: int) -> None:
    """A stand-in server's good answer: (n, 2) embeddings of 7s as .npy."""
    scripted_reply(handler, 200, npy_bytes(np.full((n, 2), 7, np.float32)), "application/x-npy")


def encoded_image(array: np.ndarray, fmt: str, quality: int, exif_orientation: int = 0) -> bytes:
    """`array` (H,W,C uint8) as a PNG/JPEG file, optionally with an EXIF orientation tag."""
    from PIL import Image

    kwargs: dict = {"quality": quality} if fmt == "JPEG" else {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def java_available() -> bool:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return 'version "17' in out.stderr or 'version "17' in out.stdout


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


def private_example_server(example_archive: str, store: str, overrides: Optional[dict] = None,
                           timeout: float = 240.0) -> TorchServe:
    """A TorchServe of a test module's own (it scales, kills or expires things), serving the example
    as `encoder` with a READY worker; the caller calls cleanup()."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    shutil.copy(example_archive, os.path.join(store, "encoder.mar"))
    server = TorchServe(store, "encoder=encoder.mar", overrides=overrides)
    server.start(timeout=timeout)
    server.wait_for_workers("encoder", timeout=timeout)
    return server


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
    """One real TorchServe for the issue-5 tests (images, multi, chlast; see feature_server.py)."""
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    from feature_server import start_feature_server

    server = start_feature_server(example_files, str(tmp_path_factory.mktemp("feature_store")))
    yield server
    server.cleanup()
