"""Checkpoints that hold more than the model: refused by default with the flag that drops exactly the
rest, accepted with --ignore-keys, and the archive then holds only the model's weights."""
from __future__ import annotations

import io
import zipfile

import pytest
import torch
import yaml

from image_embedder.checkpoints import UnwrapOptions
from image_embedder.errors import ConfigError
from image_embedder.loading import load_model
from image_embedder.settings import EncoderSettings
from image_embedder_tools.build import ArchiveSpec, build_archive, main


@pytest.fixture()
def with_head(example_files, tmp_path) -> str:
    """The example's weights plus a classification head the embedding class doesn't have."""
    state = torch.load(example_files["state_dict"], weights_only=True)
    state["head.weight"], state["head.bias"] = torch.ones(5, 10), torch.zeros(5)
    path = tmp_path / "with_head.pth"
    torch.save(state, path)
    return str(path)


def build(example_files, tmp_path, weights, **settings) -> str:
    return build_archive(ArchiveSpec(example_files["model_file"], example_files["class"], weights, "conv1",
                                     export_path=str(tmp_path / "store"), settings=settings), quiet=True)


def test_extra_keys_are_refused_naming_the_flag_that_drops_them(example_files, tmp_path, with_head):
    with pytest.raises(ConfigError) as err:
        build(example_files, tmp_path, with_head)
    message = str(err.value)
    assert "unexpected keys ['head.bias', 'head.weight']" in message
    assert "add --ignore-keys head. (handler setting ignore_keys: ['head.'])" in message
    assert not (tmp_path / "store").exists()


def test_ignore_keys_drops_exactly_those_and_the_archive_holds_the_model_weights(example_files, tmp_path,
                                                                                  with_head, capsys):
    code = main(["--model-file", example_files["model_file"], "--model-class", "CustomModel", "--state-dict",
                 with_head, "--layer", "conv1", "--ignore-keys", "head.", "--export-path", str(tmp_path / "store")])
    assert code == 0, capsys.readouterr().err
    assert "weights: a plain state_dict: 10 tensors; dropped (ignore_keys) head.bias, head.weight" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "store" / "encoder.mar") as z:
        handler = yaml.safe_load(z.read("model-config.yaml"))["handler"]
        weights = torch.load(io.BytesIO(z.read(handler["model_state_dict_path"])), weights_only=True)
    expected = torch.load(example_files["state_dict"], weights_only=True)
    assert sorted(weights) == sorted(expected)
    for key in expected:
        assert torch.equal(weights[key], expected[key])
    assert "ignore_keys" not in handler  # the archive's weights need no dropping


def test_a_prefix_that_drops_model_weights_is_refused(example_files, tmp_path, with_head):
    with pytest.raises(ConfigError, match=r"missing keys \['conv1.bias', 'conv1.weight'\]"):
        build(example_files, tmp_path, with_head, ignore_keys=["head.", "conv1."])


def test_the_worker_setting_drops_them_too(example_files, with_head):
    model = load_model(example_files["model_file"], "CustomModel", with_head,
                       unwrap_options=UnwrapOptions(ignore_keys=("head.",)))
    assert "head.weight" not in model.state_dict()
    settings = EncoderSettings.from_mapping({"model_definition_file": "m.py", "model_class_name": "M",
                                             "ignore_keys": ["head."]})
    assert UnwrapOptions.from_settings(settings).ignore_keys == ("head.",)


@pytest.mark.parametrize("value", ["head.", [""], [3]])
def test_bad_ignore_keys_values_are_refused(value):
    with pytest.raises(ConfigError, match="ignore_keys must be a list of non-empty key prefixes"):
        EncoderSettings.from_mapping({"model_definition_file": "m.py", "model_class_name": "M", "ignore_keys": value})
