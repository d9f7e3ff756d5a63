"""`build --version`: the archive's manifest carries it, a value that is not a version is refused before
anything is written, and the handler's describe answer says which version answered (in process).

The rollout with a real TorchServe (two versions side by side, set-default, retiring one under load)
is tests/test_rollout_server.py."""
from __future__ import annotations

import json
import zipfile

import pytest

from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_tools.build import main


def build_cli(example_files, out, *more: str) -> list[str]:
    return ["--model-file", example_files["model_file"], "--model-class", example_files["class"],
            "--state-dict", example_files["state_dict"], "--layer", "conv1", "--export-path", str(out), *more]


def manifest_of(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]


@pytest.fixture(scope="module")
def archives(example_files, tmp_path_factory) -> dict:
    """The example built twice, as the default version and as 2.0.1, each in its own folder."""
    built = {}
    for version, args in (("1.0", ()), ("2.0.1", ("--version", "2.0.1"))):
        out = tmp_path_factory.mktemp(f"v{version}")
        assert main(build_cli(example_files, out, *args)) == 0
        built[version] = out / "encoder.mar"
    return built


def test_the_manifest_carries_the_version_and_1_0_is_the_default(archives):
    assert {v: (manifest_of(p)["modelName"], manifest_of(p)["modelVersion"]) for v, p in archives.items()} == {
        "1.0": ("encoder", "1.0"), "2.0.1": ("encoder", "2.0.1")}


@pytest.mark.parametrize("version", ["", "abc", "1..2", "../x", "2.0/x", "v2", "1.0-rc1", " 1.0"])
def test_a_version_that_is_not_a_version_is_refused_before_anything_is_written(example_files, tmp_path, capsys,
                                                                              version):
    out = tmp_path / "store"
    assert main(build_cli(example_files, out, "--version", version)) == 2
    err = capsys.readouterr().err
    assert f"error: --version {version!r} is not a version: expected numbers joined by dots, e.g. 1.0" in err, err
    assert not out.exists()


@pytest.mark.parametrize("version", ["1.0", "2.0.1"])
def test_describe_says_which_version_answered(archives, version):
    [answer] = InProcessModel(str(archives[version])).predict([Request(b"", headers={"describe": "true"})])
    assert answer.status == 200
    assert answer.json()["model_version"] == version
