"""scripts/build_mar.py: the issue's CLI flags, build-time checks before anything is written, the
merged model-config.yaml, and an archive TorchServe can load (one handler class, no --model-file)."""
import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from image_embedder_testkit.checkout import REPO, TEST_MODELS
from image_embedder_tools.build import main
from image_embedder_tools.kserve_layout import ServingSettings

SCRIPT = os.path.join(REPO, "scripts", "build_mar.py")
ALLOWED_THIRD_PARTY = {"torch", "numpy", "yaml", "ts", "image_embedder"}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """NestedNet with weights, the sibling-importing model, and a user's own model-config.yaml."""
    folder = tmp_path_factory.mktemp("user")
    for name in ("nested_net.py", "sibling_user.py", "sibling_parts_xq7.py"):
        shutil.copy(os.path.join(TEST_MODELS, name), folder / name)
    subprocess.run([sys.executable, str(folder / "nested_net.py"), str(folder / "nested.pth")], check=True)
    config = folder / "my-config.yaml"
    config.write_text(yaml.safe_dump({
        "minWorkers": 2, "maxWorkers": 3, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 60,
        "deviceType": "cpu", "handler": {"normalize": True, "layer_name": "overridden"},
    }))
    return folder


def read_archive(path):
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read(manifest["model"]["configFile"]))
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    return names, manifest, config, sources


def full_cli(user_files, out, *more):
    return [
        "--model-file", str(user_files / "nested_net.py"), "--model-class", "NestedNet",
        "--state-dict", str(user_files / "nested.pth"), "--layer", "layer3.1.conv2", "--pooling", "max",
        "--model-kwargs", '{"classes": 5}', "--extra-files", str(user_files / "sibling_parts_xq7.py"),
        "--batch-size", "4", "--input-shape", "3,16,16", "--config-file", str(user_files / "my-config.yaml"),
        "--name", "nested", "--export-path", str(out), *more,
    ]


def test_every_flag_of_the_issue(user_files, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(full_cli(user_files, out)) == 0
    err = capsys.readouterr().err
    assert "embedding size 6" in err  # layer3.1.conv2 of NestedNet(width=6) pooled: 6 channels
    names, manifest, config, _ = read_archive(out / "nested.mar")
    assert {"nested_net.py", "nested.pth", "sibling_parts_xq7.py", "encoder_handler.py",
            "image_embedder/encoder.py", "image_embedder/__init__.py"} <= names
    assert manifest["model"]["modelName"] == "nested"
    handler = config["handler"]
    assert handler["model_definition_file"] == "nested_net.py"
    assert handler["model_class_name"] == "NestedNet"
    assert handler["model_state_dict_path"] == "nested.pth"
    assert handler["layer_name"] == "layer3.1.conv2"  # the flag beats the user's handler: value
    assert handler["pooling"] == "max"
    assert handler["model_init_kwargs"] == {"classes": 5}
    assert handler["default_batch_size"] == 4
    assert handler["input_shape"] == [3, 16, 16]
    assert handler["normalize"] is True  # the user's own handler setting is kept


def test_a_plain_state_dict_is_packed_as_it_is_without_warning(user_files, tmp_path, capsys):
    assert main(full_cli(user_files, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "weights: a plain state_dict: 12 tensors" in err and "warning" not in err
    with zipfile.ZipFile(tmp_path / "nested.mar") as z:
        assert z.read("nested.pth") == (user_files / "nested.pth").read_bytes()


def test_build_archive_takes_one_spec(user_files, tmp_path):
    from image_embedder_tools.build import ArchiveSpec, build_archive

    spec = ArchiveSpec(str(user_files / "nested_net.py"), "NestedNet", str(user_files / "nested.pth"), "features.0",
                       pooling="max", name="spec", export_path=str(tmp_path), settings={"normalize": True})
    path = build_archive(spec, quiet=True)
    _, _, config, _ = read_archive(path)
    assert config["handler"]["pooling"] == "max" and config["handler"]["normalize"] is True
    with pytest.raises(TypeError):  # beyond the first four, fields are named
        ArchiveSpec(str(user_files / "nested_net.py"), "NestedNet", None, "features.0", "max")


def test_user_config_keeps_torchserve_keys(user_files, tmp_path):
    assert main(full_cli(user_files, tmp_path)) == 0
    _, _, config, _ = read_archive(tmp_path / "nested.mar")
    assert {k: config[k] for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout",
                                   "deviceType")} == {
        "minWorkers": 2, "maxWorkers": 3, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 60,
        "deviceType": "cpu"}


def test_without_config_file_cpu_defaults_are_written(user_files, tmp_path):
    rc = main(["--model-file", str(user_files / "nested_net.py"), "--model-class", "NestedNet",
               "--state-dict", str(user_files / "nested.pth"), "--layer", "features.0", "--export-path", str(tmp_path)])
    assert rc == 0
    names, manifest, config, _ = read_archive(tmp_path / "encoder.mar")
    assert manifest["model"]["modelName"] == "encoder"
    for key in ("batchSize", "maxBatchDelay", "responseTimeout"):
        assert isinstance(config[key], int) and config[key] > 0, key
    # no worker count: TorchServe's default_workers_per_model decides on the serving machine
    assert "minWorkers" not in config and "maxWorkers" not in config, config
    assert config["handler"]["pooling"] == "avg" and "default_batch_size" not in config["handler"]
    # the same keys examples/model-config.yaml shows, and the KServe layout's fallback for a bare archive
    with open(os.path.join(REPO, "examples", "model-config.yaml")) as f:
        assert {k: v for k, v in config.items() if k != "handler"} == yaml.safe_load(f)
    fallback = ServingSettings("encoder", "1.0")
    assert (fallback.batch_size, fallback.max_batch_delay, fallback.response_timeout) == \
        (config["batchSize"], config["maxBatchDelay"], config["responseTimeout"])


def test_archive_is_loadable_by_torchserve_rules(user_files, tmp_path):
    assert main(full_cli(user_files, tmp_path)) == 0
    names, manifest, _, sources = read_archive(tmp_path / "nested.mar")
    # passing --model-file to the archiver would switch on BaseHandler's one-class model loader
    assert "modelFile" not in manifest["model"] and "serializedFile" not in manifest["model"]
    assert manifest["model"]["handler"] == "encoder_handler.py"
    # TorchServe refuses a handler module that defines more than one class
    tree = ast.parse(sources["encoder_handler.py"])
    assert [n.name for n in tree.body if isinstance(n, ast.ClassDef)] == ["EmbeddingHandler"]
    # flat: extra files land in the archive root, beside the model file
    assert "sibling_parts_xq7.py" in names and not any(n.startswith(str(user_files).lstrip("/")) for n in names)


def _module_level_imports(source):
    """Top-level packages imported at module level outside try blocks (those must exist on the server)."""
    found = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_archive_needs_only_torch_numpy_and_yaml(user_files, tmp_path):
    assert main(full_cli(user_files, tmp_path)) == 0
    _, _, _, sources = read_archive(tmp_path / "nested.mar")
    ours = {n: s for n, s in sources.items() if n == "encoder_handler.py" or n.startswith("image_embedder/")}
    assert len(ours) > 5
    for name, source in ours.items():
        foreign = _module_level_imports(source) - set(sys.stdlib_module_names) - ALLOWED_THIRD_PARTY
        assert not foreign, f"{name} imports {foreign} at module level"


def test_factory_with_kwargs_and_sibling_file(user_files, tmp_path, capsys):
    rc = main(["--model-file", str(os.path.join(TEST_MODELS, "factory_net.py")), "--model-class", "make_net",
               "--layer", "features.2", "--model-kwargs", '{"channels": 5, "depth": 2}',
               "--input-shape", "3,9,9", "--name", "factory", "--export-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0 and "embedding size 5" in err
    assert "warning: no --state-dict: the archive holds make_net's freshly initialized (untrained) weights" in err
    rc = main(["--model-file", str(user_files / "sibling_user.py"), "--model-class", "SiblingNet",
               "--layer", "stem", "--extra-files", str(user_files / "sibling_parts_xq7.py"),
               "--input-shape", "3,6,6", "--name", "sib", "--export-path", str(tmp_path)])
    assert rc == 0 and "embedding size 5" in capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (("--model-class", "NestedNett"), ["'NestedNett'", "NestedNet"]),
    (("--layer", "layer3.1.conv3"), ["'layer3.1.conv3'", "layer3.1.conv2"]),
    (("--model-kwargs", '{"width": 4}'), ["size mismatch"]),
    (("--model-kwargs", "{width: 4}"), ["--model-kwargs is not valid JSON"]),
    (("--model-kwargs", "[1]"), ["--model-kwargs must be a JSON object"]),
    (("--input-shape", "3,x,16"), ["--input-shape", "integers"]),
    (("--input-shape", "4,16,16"), ["channels"]),
    (("--state-dict", "/nonexistent/w.pth"), ["does not exist"]),
])
def test_mistakes_fail_before_anything_is_written(user_files, tmp_path, capsys, change, expected):
    out = tmp_path / "store"
    argv = full_cli(user_files, out)
    argv[argv.index(change[0]) + 1] = change[1]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()  # progress lines may come before the error
    assert any(line.startswith("error: ") for line in lines)
    err = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")):])
    for text in expected:
        assert text in err
    assert not out.exists() or not os.listdir(out)


def test_errors_name_the_users_model_file_not_the_staged_copy(user_files, tmp_path, capsys):
    argv = full_cli(user_files, tmp_path / "store")
    argv[argv.index("--model-class") + 1] = "NestedNett"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"is not a class or function in {str(user_files / 'nested_net.py')!r}" in err
    assert "mar-build-" not in err


def test_bad_pooling_is_refused_by_the_parser(user_files, tmp_path, capsys):
    argv = full_cli(user_files, tmp_path / "store")
    argv[argv.index("--pooling") + 1] = "mean"
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "invalid choice: 'mean'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_weights_that_are_not_a_plain_state_dict(user_files, tmp_path, capsys):
    whole = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), whole)
    argv = full_cli(user_files, tmp_path / "store")
    argv[argv.index("--state-dict") + 1] = str(whole)
    assert main(argv) == 2
    assert "weights_only" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_cli_as_a_script(user_files, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, *full_cli(user_files, tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "embedding size 6" in proc.stdout + proc.stderr
    assert (tmp_path / "nested.mar").is_file()
    bad = subprocess.run([sys.executable, SCRIPT, *full_cli(user_files, tmp_path / "bad"), "--layer", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_build_leaves_another_builds_staging_folder_alone(user_files, tmp_path, monkeypatch):
    """torch-model-archiver stages in <tmp>/<name> and deletes it: parallel builds of one name must not collide."""
    import tempfile

    shared = tmp_path / "shared_tmp"
    other_build = shared / "nested"  # what a concurrent build of the same name would be using right now
    other_build.mkdir(parents=True)
    (other_build / "in_progress.py").write_text("# another build's file\n")
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    assert main(full_cli(user_files, tmp_path / "store")) == 0
    assert (other_build / "in_progress.py").is_file()
    assert tempfile.gettempdir() == str(shared)


def test_a_partial_user_config_keeps_the_build_defaults_it_leaves_out(user_files, tmp_path):
    """A model-config.yaml that sets only the workers keeps the build's batching (not TorchServe's
    batchSize 1): the user's keys win, the rest are the defaults an archive without one gets."""
    from image_embedder_tools.ts_defaults import DEFAULT_TS_CONFIG

    partial = tmp_path / "workers-only.yaml"
    partial.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30}))
    assert main(["--model-file", str(user_files / "nested_net.py"), "--model-class", "NestedNet",
                 "--state-dict", str(user_files / "nested.pth"), "--layer", "features.0",
                 "--config-file", str(partial), "--export-path", str(tmp_path)]) == 0
    _, _, config, _ = read_archive(tmp_path / "encoder.mar")
    assert {k: config[k] for k in ("minWorkers", "maxWorkers", "responseTimeout")} == \
        {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30}
    assert (config["batchSize"], config["maxBatchDelay"]) == \
        (DEFAULT_TS_CONFIG["batchSize"], DEFAULT_TS_CONFIG["maxBatchDelay"])


def test_a_batch_delay_torchserve_would_read_as_100_ms_is_refused(user_files, tmp_path, capsys):
    """TorchServe 0.12 reads maxBatchDelay 0 in model-config.yaml as unset and holds every batch for
    its default 100 ms (measured: a lone b32 request of the example 150 ms against 58 at 5 ms)."""
    config = tmp_path / "no-delay.yaml"
    config.write_text(yaml.safe_dump({"batchSize": 8, "maxBatchDelay": 0}))
    argv = ["--model-file", str(user_files / "nested_net.py"), "--model-class", "NestedNet",
            "--state-dict", str(user_files / "nested.pth"), "--layer", "features.0",
            "--config-file", str(config), "--export-path", str(tmp_path / "store")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "maxBatchDelay 0" in err and "100 ms" in err and "set 1 or more" in err, err
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")
    config.write_text(yaml.safe_dump({"batchSize": 1, "maxBatchDelay": 0}))  # no batching: no wait either
    assert main(argv) == 0
