"""Each part ships to where it runs: an archive carries handler/ and nothing else, the client installs
alone without torch, one editable install gives every part from any directory, and an installed
(non-editable) wheel of the tools finds its package data from any directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from image_embedder_testkit import background
from image_embedder_testkit.background import Completed, Lane
from image_embedder_testkit.checkout import REPO

# top-level module -> the file it must be imported from, relative to the checkout
PARTS = {
    "encoder_handler": "handler/encoder_handler.py",
    "image_embedder": "handler/image_embedder/__init__.py",
    "image_embedder_client": "client/image_embedder_client/__init__.py",
    "image_embedder_tools": "tools/image_embedder_tools/__init__.py",
    "image_embedder_bench": "bench/image_embedder_bench/__init__.py",
    "image_embedder_testkit": "testkit/image_embedder_testkit/__init__.py",
}
ENGINE_ONLY = {"torch", "pillow", "safetensors", "torchserve", "torch-model-archiver", "pyyaml", "image-embedder"}


def git_files(folder: str) -> list[str]:
    """Files of `folder` as git sees them (tracked, and untracked but not ignored), relative to it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", folder],
                            cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    return sorted(os.path.relpath(rel, folder) for rel in listed if rel and os.path.isfile(os.path.join(REPO, rel)))


def copy_source(tmp_path, *parts: str) -> str:
    """A copy of these parts of the checkout, so a build writes its egg-info and build/ there, not here."""
    dest = tmp_path / "src"
    for part in parts:
        src = os.path.join(REPO, part)
        if os.path.isdir(src):
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
        else:
            dest.mkdir(exist_ok=True)
            shutil.copy2(src, dest / part)
    return str(dest)


def test_archive_holds_handler_folder_and_the_users_files_only(example_archive):
    with zipfile.ZipFile(example_archive) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))
        handler = git_files("handler")
        user = ["MAR-INF/MANIFEST.json", "model-config.yaml", "model.py", "model_state_dict.pth"]
        assert names == sorted(handler + user)
        for rel in handler:
            with open(os.path.join(REPO, "handler", rel), "rb") as f:
                assert archive.read(rel) == f.read(), rel
    assert not [n for n in names if "client" in n or "tools" in n or "bench" in n or "testkit" in n]


def resolve_client_alone(lane: Lane, folder: str) -> tuple[Completed, str]:
    """pip's install report for client/ by itself (a dry run into nothing): (what pip did, the report)."""
    source = copy_source(Path(folder), "client")
    report = os.path.join(folder, "report.json")
    return lane.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation",
                     "--quiet", "--report", report, os.path.join(source, "client")], cwd=folder, env=dict(os.environ),
                    timeout=300), report


CLIENT_ALONE = background.job("pip resolves the client alone", resolve_client_alone)


@pytest.mark.background(CLIENT_ALONE.name)
def test_client_installs_alone_without_the_engine():
    """pip resolves client/ by itself: numpy, requests, urllib3 and theirs; nothing of the engine, and
    grpcio only for the `grpc` extra."""
    run, report = CLIENT_ALONE.result()
    if run.returncode != 0:
        pytest.fail("pip could not resolve client/'s dependencies (it needs a package index, as any install "
                    f"does):\n{run.stderr[-3000:]}")
    with open(report) as f:
        installs = {item["metadata"]["name"].lower(): item["metadata"] for item in json.load(f)["install"]}
    assert {"image-embedder-client", "numpy", "requests", "urllib3"} <= set(installs), sorted(installs)
    assert not ENGINE_ONLY & set(installs), sorted(installs)
    assert "grpcio" not in installs, sorted(installs)
    assert sorted(installs["image-embedder-client"]["requires_dist"]) == [
        'grpcio>=1.60; extra == "grpc"', "numpy", "requests", "urllib3>=2"]


def test_client_wheel_holds_the_client_package_only(tmp_path):
    source = copy_source(tmp_path, "client")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), os.path.join(source, "client")], check=True, timeout=300)
    [wheel] = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as archive:
        modules = {n for n in archive.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert modules == {f"image_embedder_client/{name}.py" for name in ("__init__", "client", "grpc_transport",
                                                                        "grpc_messages")}


def test_client_imports_with_the_engine_blocked(tmp_path):
    """The client runs where only numpy and requests are installed: torch, Pillow, TorchServe, yaml, grpcio
    (for grpc:// urls only) and every other part of this project are made unimportable first."""
    blocked = ("torch", "ts", "PIL", "yaml", "grpc", "encoder_handler", "image_embedder", "image_embedder_tools",
               "image_embedder_bench", "image_embedder_testkit")
    code = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            "from image_embedder_client import EmbeddingClient\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def import_every_part(lane: Lane, folder: str) -> Completed:
    """Each part imported by a fresh interpreter in an unrelated folder: the files they come from, as JSON."""
    code = ("import importlib, json\n"
            f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {list(PARTS)!r}}}))")
    return lane.run([sys.executable, "-c", code], cwd=folder, env=dict(os.environ), timeout=120)


EVERY_PART = background.job("import every part from elsewhere", import_every_part)


@pytest.mark.background(EVERY_PART.name)
def test_editable_install_gives_every_part_from_any_directory():
    out = EVERY_PART.result()
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert {m: os.path.relpath(path, REPO) for m, path in found.items()} == PARTS


def test_image_embedder_command_reaches_every_tool(tmp_path):
    command = os.path.join(os.path.dirname(sys.executable), "image-embedder")
    out = subprocess.run([command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("\ncommands:\n")[1]
    for name in ("build", "embed", "search", "inspect", "kserve-layout", "bench", "load-test", "soak"):
        assert f"  {name} " in listed, listed
    assert "not installed" not in listed, listed


def test_installed_wheel_lays_out_kserve_from_any_directory(tmp_path, example_archive):
    """A non-editable install: the wheel unpacked, run with no site (no editable finder), from elsewhere."""
    source = copy_source(tmp_path, "pyproject.toml", "README.md", "handler", "client", "tools", "bench", "testkit")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), source], check=True, timeout=300)
    [wheel] = os.listdir(tmp_path / "dist")
    site = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as archive:
        archive.extractall(site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, image_embedder_tools.kserve_layout as k\nprint(k.__file__)\n"
            "sys.exit(k.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-S", "-c", code, example_archive, "layout"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site)), out.stdout
    with open(os.path.join(REPO, "tools", "image_embedder_tools", "kserve", "config.properties")) as f:
        shipped = f.read()
    written = (elsewhere / "layout" / "config" / "config.properties").read_text()
    assert written.startswith(shipped.rstrip("\n") + "\nmodel_snapshot=")
    assert (elsewhere / "layout" / "model-store" / "encoder.mar").is_file()
