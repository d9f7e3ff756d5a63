"""Declared preprocessing at build time: presets, a model file's IMAGE_PREPROCESSING, explicit settings
on top, the one line the build prints, and clear refusals. The served embeddings are checked in
test_preprocessing_server.py."""
from __future__ import annotations

import zipfile

import pytest
import yaml

from image_embedder.errors import ConfigError
from image_embedder_testkit.imagenet import MEAN, STD
from image_embedder_testkit.model_files import example_with
from image_embedder_tools.build import ArchiveSpec, build_archive

DECLARED = {"scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0], "resize": 40}


def declaring_model(folder, declaration) -> str:
    """The example model file with a module-level IMAGE_PREPROCESSING."""
    return example_with(str(folder), "declaring_model", f"IMAGE_PREPROCESSING = {declaration!r}")


def handler_section(mar: str) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))["handler"]


def build(example_files, tmp_path, model_file=None, **options) -> str:
    return build_archive(ArchiveSpec(model_file or example_files["model_file"], example_files["class"],
                                     example_files["state_dict"], "conv1", export_path=str(tmp_path / "store"),
                                     **options))


def preprocessing_line(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith("preprocessing")]
    return line


def test_nothing_declared_says_what_reaches_the_model_and_how_to_declare(example_files, tmp_path, capsys):
    section = handler_section(build(example_files, tmp_path))
    assert not {"scale", "mean", "std", "resize"} & set(section)
    line = preprocessing_line(capsys.readouterr().err)
    assert "nothing declared" in line and "IMAGE_PREPROCESSING" in line and "--preset imagenet|unit|none" in line
    assert "pixels 0..255, no normalization" in line


@pytest.mark.parametrize("preset, expected", [
    ("imagenet", {"scale": 1 / 255, "mean": list(MEAN), "std": list(STD)}),
    ("unit", {"scale": 1 / 255}),
    ("none", {}),
])
def test_presets_write_their_settings(example_files, tmp_path, capsys, preset, expected):
    section = handler_section(build(example_files, tmp_path, preset=preset))
    got = {k: section[k] for k in ("scale", "mean", "std") if k in section}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    line = preprocessing_line(capsys.readouterr().err)
    assert f"--preset {preset}" in line
    assert ("no normalization" in line) == (preset == "none")


def test_model_file_declaration_is_taken(example_files, tmp_path, capsys):
    section = handler_section(build(example_files, tmp_path, model_file=declaring_model(tmp_path, DECLARED)))
    assert {k: section[k] for k in DECLARED} == DECLARED and "std" not in section
    line = preprocessing_line(capsys.readouterr().err)
    assert "IMAGE_PREPROCESSING in declaring_model.py" in line and "resized to 40" in line


def test_set_wins_over_preset_and_preset_over_the_model_file(example_files, tmp_path):
    section = handler_section(build(example_files, tmp_path, model_file=declaring_model(tmp_path, DECLARED),
                                    preset="unit", settings={"scale": 0.5}))
    assert section["scale"] == 0.5  # --set
    assert "mean" not in section  # the preset's `unit` removes the file's mean
    assert section["resize"] == 40  # the preset says nothing of resize: the file's stays
    section = handler_section(build(example_files, tmp_path, model_file=declaring_model(tmp_path, DECLARED),
                                    preset="none"))
    assert not {"scale", "mean", "std"} & set(section) and section["resize"] == 40


@pytest.mark.parametrize("declaration, words", [
    ({"scale": 1 / 255, "crop": 224}, ["unknown key(s) 'crop'", "valid keys: resize, center_crop"]),
    ([1, 2], ["must be a dict, got list"]),
    ({"scale": "1/255"}, ["scale must be a number, got '1/255'"]),
])
def test_bad_declarations_are_refused_naming_the_file(example_files, tmp_path, declaration, words):
    with pytest.raises(ConfigError) as err:
        build(example_files, tmp_path, model_file=declaring_model(tmp_path, declaration))
    for word in words:
        assert word in str(err.value)
    assert "declaring_model.py" in str(err.value)
    assert not (tmp_path / "store").exists()


def test_unknown_preset_is_refused_before_anything_is_written(example_files, tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'imagenett'; choose one of imagenet, unit, none"):
        build(example_files, tmp_path, preset="imagenett")
    assert not (tmp_path / "store").exists()


def test_cli_refuses_an_unknown_preset(example_files, tmp_path, capsys):
    from image_embedder_tools.build import main
    with pytest.raises(SystemExit):
        main(["--model-file", example_files["model_file"], "--model-class", "CustomModel", "--layer", "conv1",
              "--preset", "imagenett", "--export-path", str(tmp_path / "store")])
    assert "invalid choice: 'imagenett'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
