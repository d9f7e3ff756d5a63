"""loading.py: import a model file privately, build a class or factory, load weights strictly and safely."""
import os
import shutil
import sys

import pytest
import torch

from image_embedder.errors import ConfigError
from image_embedder.layer_tap import resolve_layer
from image_embedder.loading import build_model, import_model_file, load_model, load_state_dict
from image_embedder_testkit.checkout import TEST_MODELS

NESTED = os.path.join(TEST_MODELS, "nested_net.py")
FACTORY = os.path.join(TEST_MODELS, "factory_net.py")


@pytest.fixture
def nested_weights(tmp_path):
    path = tmp_path / "nested.pth"
    torch.manual_seed(3)
    sys.path.insert(0, TEST_MODELS)
    try:
        from nested_net import NestedNet
    finally:
        sys.path.remove(TEST_MODELS)
    model = NestedNet(width=5)
    torch.save(model.state_dict(), path)
    return str(path), model.state_dict()


def test_class_gets_its_kwargs():
    model = load_model(NESTED, "NestedNet", None, {"width": 5, "classes": 7})
    assert (model.head.in_features, model.head.out_features) == (5, 7)


def test_class_with_kwargs_loads_exact_weights(nested_weights):
    path, state = nested_weights
    model = load_model(NESTED, "NestedNet", path, {"width": 5})
    assert type(model).__name__ == "NestedNet" and not model.training
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_factory_function_with_kwargs():
    model = load_model(FACTORY, "make_net", None, {"channels": 7, "depth": 2})
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [7, 7]
    assert isinstance(resolve_layer(model, "features.2"), torch.nn.Conv2d)


def test_model_file_imports_a_sibling_file(tmp_path):
    for name in ("sibling_user.py", "sibling_parts_xq7.py"):
        shutil.copy(os.path.join(TEST_MODELS, name), tmp_path / name)
    sys.modules.pop("sibling_parts_xq7", None)
    model = load_model(str(tmp_path / "sibling_user.py"), "SiblingNet", None)
    assert type(model.stem).__name__ == "Stem"
    assert os.path.dirname(sys.modules["sibling_parts_xq7"].__file__) == str(tmp_path)
    assert model(torch.zeros(1, 3, 6, 6)).shape == (1, 2, 6, 6)


def test_main_block_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "main_ran"
    monkeypatch.setenv("MARK_MAIN_RAN", str(marker))
    module = import_model_file(NESTED)
    assert module.__name__ != "__main__"
    assert hasattr(module, "NestedNet")
    assert not marker.exists()
    # the marker mechanism itself works: running the file as a script does leave it
    import runpy
    runpy.run_path(NESTED, run_name="__main__")
    assert marker.exists()


def test_each_import_is_a_private_module():
    a, b = import_model_file(NESTED), import_model_file(NESTED)
    assert a.__name__ != b.__name__ and a.NestedNet is not b.NestedNet


def test_missing_model_file():
    with pytest.raises(ConfigError, match="does not exist"):
        import_model_file("/nonexistent/model.py")


def test_model_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\nraise ImportError('no module named fancy_layers')\n")
    with pytest.raises(ConfigError, match="fancy_layers"):
        import_model_file(str(bad))


def test_unknown_class_lists_what_the_file_defines():
    module = import_model_file(NESTED)
    with pytest.raises(ConfigError) as err:
        build_model(module, "NestedNett")
    message = str(err.value)
    assert "'NestedNett'" in message
    assert "NestedNet" in message.split("defined there:")[1] and "Block" in message


def test_factory_error_names_the_call():
    module = import_model_file(FACTORY)
    with pytest.raises(ConfigError, match=r"make_net\(\*\*\{'widht': 3\}\) failed: TypeError"):
        build_model(module, "make_net", {"widht": 3})


def test_factory_must_return_a_module(tmp_path):
    f = tmp_path / "notmodel.py"
    f.write_text("def make():\n    return 3\n")
    with pytest.raises(ConfigError, match="returned int, expected a torch.nn.Module"):
        load_model(str(f), "make", None)


def test_strict_load_lists_missing_and_unexpected_keys(nested_weights, tmp_path):
    _, state = nested_weights
    state = dict(state)
    del state["head.bias"]
    state["head.extra"] = torch.zeros(1)
    path = tmp_path / "mismatch.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        load_model(NESTED, "NestedNet", str(path), {"width": 5})
    message = str(err.value)
    assert "missing keys ['head.bias']" in message
    assert "unexpected keys ['head.extra']" in message


def test_shape_mismatch_is_a_config_error(nested_weights):
    path, _ = nested_weights
    with pytest.raises(ConfigError, match="size mismatch"):
        load_model(NESTED, "NestedNet", path, {"width": 4})


class _Payload:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(str(marker))}, f)
    with pytest.raises(ConfigError) as err:
        load_state_dict(str(path))
    assert "weights_only=True" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()
    with open(path, "rb") as f:  # the file really is a working payload
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_whole_pickled_model_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ConfigError, match="weights_only"):
        load_state_dict(str(path))


def test_weights_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConfigError, match="holds a list, expected a state_dict mapping"):
        load_state_dict(str(path))


def test_sha256_mismatch_is_refused(nested_weights):
    path, _ = nested_weights
    with pytest.raises(ConfigError, match="expected 0{64}"):
        load_state_dict(path, sha256="0" * 64)


def test_unknown_layer_names_the_closest_valid_names(nested_weights):
    model = load_model(NESTED, "NestedNet", nested_weights[0], {"width": 5})
    with pytest.raises(ConfigError) as err:
        resolve_layer(model, "layer3.1.conv3")
    message = str(err.value)
    assert "'layer3.1.conv3'" in message and "NestedNet" in message
    closest = message.split("closest valid names:")[1]
    assert "layer3.1.conv2" in closest and "layer3.1.conv1" in closest


def test_nested_layers_resolve(nested_weights):
    model = load_model(NESTED, "NestedNet", nested_weights[0], {"width": 5})
    assert resolve_layer(model, "layer3.1.conv2") is model.layer3[1].conv2
    assert resolve_layer(model, "features.0") is model.features[0]
    with pytest.raises(ConfigError):
        resolve_layer(model, "")


def test_wrapped_weights_are_found_and_the_report_says_how(nested_weights, tmp_path):
    from image_embedder.loading import load_weights

    _, state = nested_weights
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 7}, path)
    model = load_model(NESTED, "NestedNet", str(path), {"width": 5})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    fresh = build_model(import_model_file(NESTED), "NestedNet", {"width": 5})
    report = load_weights(fresh, str(path), shown_as="my/wrapped.pth")
    assert report.lines() == [f"took `state_dict`, stripped `module.`: {len(state)} tensors; ignored epoch"]


def test_errors_name_the_file_as_shown(nested_weights):
    path, _ = nested_weights
    with pytest.raises(ConfigError) as err:
        load_state_dict(path, sha256="0" * 64, shown_as="archive/nested.pth")
    assert "'archive/nested.pth' has sha256" in str(err.value) and path not in str(err.value)
