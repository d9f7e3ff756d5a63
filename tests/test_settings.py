"""EncoderSettings: defaults follow the original encoder; every bad value fails with a message naming it."""
from dataclasses import fields

import pytest

from image_embedder.errors import ConfigError
from image_embedder.settings import CHECKS, POOLINGS, EncoderSettings

BASE = {"model_definition_file": "model.py", "model_class_name": "CustomModel"}


def settings(**extra):
    return EncoderSettings.from_mapping({**BASE, **extra})


def test_defaults_follow_the_original_encoder():
    s = settings()
    assert s.layer_name == "features" and s.layer_names == ("features",)
    assert s.pooling == "avg"
    assert s.default_batch_size is None  # the original's 32 on a GPU, 8 on a CPU
    assert (s.pass_size("cuda"), s.pass_size("cpu")) == (32, 8)
    assert dict(s.model_init_kwargs) == {}
    assert s.model_state_dict_path is None
    assert s.device is None


def test_valid_values_are_kept():
    s = settings(layer_name="layer3.1.conv2", pooling="cls", model_init_kwargs={"width": 3},
                 default_batch_size=4, device="cpu", model_state_dict_path="w.pth")
    assert s.layer_names == ("layer3.1.conv2",)
    assert (s.pooling, s.default_batch_size, s.device, s.model_state_dict_path) == ("cls", 4, "cpu", "w.pth")
    assert dict(s.model_init_kwargs) == {"width": 3}
    assert settings(layer_name=["a", "b.c"]).layer_names == ("a", "b.c")


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        settings(layer_nmae="conv1")
    message = str(err.value)
    assert "'layer_nmae'" in message
    assert "did you mean 'layer_name'" in message
    assert "valid settings" in message and "pooling" in message


def test_jina_traversal_paths_is_not_a_setting():
    with pytest.raises(ConfigError, match="default_traversal_paths"):
        settings(default_traversal_paths=["r"])


@pytest.mark.parametrize("missing", ["model_definition_file", "model_class_name"])
def test_required_settings(missing):
    raw = dict(BASE)
    del raw[missing]
    with pytest.raises(ConfigError, match=f"{missing}.*required"):
        EncoderSettings.from_mapping(raw)


def test_missing_handler_section_is_a_config_error():
    with pytest.raises(ConfigError, match="required"):
        EncoderSettings.from_mapping(None)


def test_bad_pooling_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        settings(pooling="mean")
    assert "'mean'" in str(err.value)
    for choice in POOLINGS:
        assert choice in str(err.value)


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True])
def test_default_batch_size_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match=f"default_batch_size must be a positive integer, got {value!r}"):
        settings(default_batch_size=value)


@pytest.mark.parametrize("value", ["", [], [""], 3, ["a", 1]])
def test_bad_layer_name(value):
    with pytest.raises(ConfigError, match="layer_name"):
        settings(layer_name=value)


@pytest.mark.parametrize("value", [[1, 2], "width=3", 3])
def test_model_init_kwargs_must_be_a_mapping(value):
    with pytest.raises(ConfigError, match="model_init_kwargs must be a mapping"):
        settings(model_init_kwargs=value)


@pytest.mark.parametrize("key, value, expected", [
    ("early_exit", "yes", "early_exit must be true or false"),
    ("gem_p", 0, "gem_p must be a positive number"),
    ("dtype", "int8", "dtype 'int8' is not one of"),
    ("sha256", "abc", "sha256 must be 64 hex digits"),
    ("input_shape", [3, 0, 4], "input_shape entries must be a positive integer"),
    ("std", [1.0, 0.0, 1.0], "std must not contain 0"),
])
def test_other_bad_values_name_the_setting(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        settings(**{key: value})


def test_every_setting_declares_its_kind():
    assert list(CHECKS) and set(CHECKS) == {f.name for f in fields(EncoderSettings)}


def test_as_dict_round_trips():
    s = settings(layer_name=["a", "b"], model_init_kwargs={"k": 1}, input_shape=[3, 8, 8])
    assert EncoderSettings.from_mapping(s.as_dict()) == s
