"""The checkpoints training code really writes: one archive per kind of file, built with
scripts/build_mar.py, its SERVED embeddings (TorchServe's Service.predict in process, and one real
TorchServe) checked against image_embedder_testkit.reference run on the original model; refusals with their
messages; the archive's size with and without optimizer state."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import requests
import torch
import yaml

from image_embedder.checkpoints import UnwrapOptions, unwrap
from image_embedder.errors import ConfigError
from image_embedder.loading import load_model
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import TEST_MODELS
from image_embedder_testkit.reference import load_reference_model, reference_embeddings
from image_embedder_testkit.ts_inprocess import InProcessModel, Request
from image_embedder_testkit.ts_server import TorchServe, java_available
from image_embedder_tools.build import main

MODEL_FILE = os.path.join(TEST_MODELS, "nested_net.py")
KWARGS = {"width": 24}
LAYER = "layer3.1.conv2"
IMAGES = np.random.default_rng(11).standard_normal((3, 3, 16, 16)).astype(np.float32)


def _seeded_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return load_reference_model(MODEL_FILE, "NestedNet", None, KWARGS).state_dict()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict:
    """The trained weights and their EMA twin, each as the plain state_dict the reference loads."""
    folder = tmp_path_factory.mktemp("originals")
    out = {"folder": folder}
    for name, seed in (("model", 1), ("ema", 2)):
        out[name] = _seeded_state(seed)
        out[f"{name}_file"] = str(folder / f"{name}_plain.pth")
        torch.save(out[name], out[f"{name}_file"])
    return out


def reference(weights_file: str) -> np.ndarray:
    """What the original model embeds: reference.py, plain hook, with torch's own strict load."""
    model = load_reference_model(MODEL_FILE, "NestedNet", weights_file, KWARGS)
    return reference_embeddings(model, LAYER, IMAGES)


# --- the files of the table, written the way training code writes them ---------------------

def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def write_data_parallel(folder, o) -> str:
    model = load_reference_model(MODEL_FILE, "NestedNet", o["model_file"], KWARGS)
    path = folder / "ddp.pth"
    torch.save(torch.nn.DataParallel(model).state_dict(), path)  # DDP writes the same `module.` keys
    return str(path)


def write_training_loop(folder, o) -> str:
    path = folder / "checkpoint_epoch3.pth"
    torch.save({"state_dict": o["model"], "epoch": 3}, path)
    return str(path)


def lightning_checkpoint(o) -> dict:
    """What `Trainer.save_checkpoint` writes for a LightningModule holding the net as `self.model`
    (and a loss with a class-weight buffer beside it), with a real Adam state after one step."""
    model = load_reference_model(MODEL_FILE, "NestedNet", o["model_file"], KWARGS).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()  # fills exp_avg / exp_avg_sq: twice the weights again
    state = _prefixed(o["model"], "model.")
    state["criterion.weight"] = torch.ones(5)
    return {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25)}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "width": 24},
    }


def write_lightning(folder, o) -> str:
    path = folder / "epoch=3-step=120.ckpt"
    torch.save(lightning_checkpoint(o), path)
    return str(path)


def write_compiled(folder, o) -> str:
    model = load_reference_model(MODEL_FILE, "NestedNet", o["model_file"], KWARGS)
    path = folder / "compiled.pth"
    torch.save(torch.compile(model).state_dict(), path)  # wrapping is enough: keys get `_orig_mod.`
    return str(path)


def write_timm_ema(folder, o) -> str:
    path = folder / "timm_model_ema.pth"
    torch.save({"model": o["model"], "model_ema": o["ema"], "epoch": 3}, path)
    return str(path)


def write_timm_state_dict_ema(folder, o) -> str:
    path = folder / "timm_state_dict_ema.pth.tar"
    torch.save({"state_dict": o["model"], "state_dict_ema": o["ema"], "epoch": 3, "arch": "nested"}, path)
    return str(path)


def write_sharded(folder, o) -> str:
    from safetensors.torch import save_file

    keys = sorted(o["model"])
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: o["model"][k].contiguous() for k in names}, str(folder / shard))
        weight_map.update({k: shard for k in names})
    total = sum(t.numel() * t.element_size() for t in o["model"].values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return str(index)


@dataclass(frozen=True)
class Case:
    """One row of the issue's table: how the file is written, the flags, what the build must say."""

    name: str
    write: Callable
    said: str
    flags: tuple = ()
    weights: str = "model"  # which original the served embeddings must equal
    archived: str = ""  # the weights file the archive must hold


ROWS = [
    Case("ddp", write_data_parallel, "stripped `module.`: 12 tensors", archived="ddp.pth"),
    Case("loop", write_training_loop, "took `state_dict`: 12 tensors; ignored epoch",
         archived="checkpoint_epoch3.pth"),
    Case("lightning", write_lightning, "took `state_dict`, stripped `model.`: 12 tensors",
         archived="epoch=3-step=120.pth"),
    Case("compiled", write_compiled, "stripped `_orig_mod.`: 12 tensors", archived="compiled.pth"),
    Case("timm_ema", write_timm_ema, "took `model_ema`: 12 tensors; ignored model, epoch",
         flags=("--checkpoint-key", "model_ema"), weights="ema", archived="timm_model_ema.pth"),
    Case("timm_state_dict_ema", write_timm_state_dict_ema, "took `state_dict_ema`: 12 tensors",
         flags=("--checkpoint-key", "state_dict_ema"), weights="ema", archived="timm_state_dict_ema.pth"),
    Case("sharded", write_sharded, "a plain state_dict: 12 tensors", archived="model.safetensors"),
]


def build(state_dict: str, out, name: str, *flags: str) -> list[str]:
    return ["--model-file", MODEL_FILE, "--model-class", "NestedNet", "--model-kwargs", json.dumps(KWARGS),
            "--state-dict", state_dict, "--layer", LAYER, "--name", name, "--export-path", str(out), *flags]


def archived_weights(mar: str) -> tuple[str, bytes, dict]:
    """The archive's weights file (name, bytes) and its handler settings."""
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        handler = yaml.safe_load(z.read(manifest["model"]["configFile"]))["handler"]
        name = handler["model_state_dict_path"]
        return name, z.read(name), handler


def read_tensors(name: str, data: bytes) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        from safetensors.torch import load
        return load(data)
    return torch.load(io.BytesIO(data), weights_only=True)


def served(mar: str, name: str) -> np.ndarray:
    service = InProcessModel(mar, model_name=name)
    (response,) = service.predict([Request(npy_bytes(IMAGES))])
    assert response.status == 200, response.body
    return np.asarray(response.json()["embeddings"], dtype=np.float32)


@pytest.mark.parametrize("case", ROWS, ids=[c.name for c in ROWS])
def test_each_checkpoint_kind_serves_the_original_embeddings(case, originals, tmp_path, capsys):
    source = case.write(tmp_path, originals)
    assert main(build(source, tmp_path / "store", case.name, *case.flags)) == 0
    said = capsys.readouterr().err
    assert f"weights: {case.said}" in said
    mar = str(tmp_path / "store" / f"{case.name}.mar")
    name, data, handler = archived_weights(mar)
    # the archive holds the clean weights, and its sha256 covers exactly them
    assert name == case.archived
    assert handler["sha256"] == hashlib.sha256(data).hexdigest()
    assert not {"checkpoint_key", "strip_prefix"} & set(handler)
    clean = read_tensors(name, data)
    expected = originals[case.weights]
    assert sorted(clean) == sorted(expected)
    assert all(torch.equal(clean[k], expected[k]) for k in expected)
    np.testing.assert_allclose(served(mar, case.name), reference(originals[f"{case.weights}_file"]),
                               rtol=1e-5, atol=1e-5)


def test_ema_choice_really_changes_the_embeddings(originals):
    """The EMA rows above would pass vacuously if both sets of weights embedded alike."""
    assert not np.allclose(reference(originals["model_file"]), reference(originals["ema_file"]), atol=1e-3)


def test_build_says_how_much_smaller_and_archive_size_without_optimizer_state(originals, tmp_path, capsys):
    ckpt = write_lightning(tmp_path, originals)
    assert main(build(ckpt, tmp_path / "store", "from_ckpt")) == 0
    said = capsys.readouterr().err
    assert main(build(originals["model_file"], tmp_path / "store", "from_plain")) == 0
    capsys.readouterr()
    ckpt_size, plain_size = os.path.getsize(ckpt), os.path.getsize(originals["model_file"])
    assert ckpt_size > 2.5 * plain_size  # Adam's two moments: the checkpoint is 3x the weights
    line = next(line for line in said.splitlines() if "smaller" in line)
    stated = int(line.split(": ")[-1].split("%")[0])
    _, data, _ = archived_weights(str(tmp_path / "store" / "from_ckpt.mar"))
    assert stated == round(100 * (ckpt_size - len(data)) / ckpt_size)
    assert stated >= 60
    # the two archives hold the same weights: their sizes differ by file names only, not by 2x state
    from_ckpt = os.path.getsize(tmp_path / "store" / "from_ckpt.mar")
    from_plain = os.path.getsize(tmp_path / "store" / "from_plain.mar")
    assert abs(from_ckpt - from_plain) < 1024, (from_ckpt, from_plain)
    assert from_ckpt < from_plain + ckpt_size - plain_size - 1024 * 64


# --- refusals --------------------------------------------------------------------------------------

def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: "):]


def test_ambiguous_file_is_refused_naming_the_choices(originals, tmp_path, capsys):
    source = write_timm_state_dict_ema(tmp_path, originals)
    err = refused(build(source, tmp_path / "store", "amb"), capsys)
    assert "several complete sets of weights" in err
    assert "took `state_dict` (--checkpoint-key state_dict)" in err
    assert "took `state_dict_ema` (--checkpoint-key state_dict_ema)" in err
    assert source in err
    assert not (tmp_path / "store").exists()


def test_two_prefixed_models_in_one_lightning_module_are_ambiguous(originals, tmp_path, capsys):
    path = tmp_path / "two.ckpt"
    torch.save({"state_dict": {**_prefixed(originals["model"], "model."), **_prefixed(originals["ema"], "ema_model.")}},
               path)
    err = refused(build(str(path), tmp_path / "store", "two"), capsys)
    assert "--checkpoint-key state_dict --strip-prefix ema_model." in err
    assert "--checkpoint-key state_dict --strip-prefix model." in err
    assert main(build(str(path), tmp_path / "store", "two", "--strip-prefix", "ema_model.")) == 0
    assert "took `state_dict`, stripped `ema_model.`" in capsys.readouterr().err
    np.testing.assert_allclose(served(str(tmp_path / "store" / "two.mar"), "two"), reference(originals["ema_file"]),
                               rtol=1e-5, atol=1e-5)


def test_partial_match_is_refused_with_the_closest_reading(originals, tmp_path, capsys):
    ckpt = lightning_checkpoint(originals)
    del ckpt["state_dict"]["model.head.bias"]
    path = tmp_path / "partial.ckpt"
    torch.save(ckpt, path)
    err = refused(build(str(path), tmp_path / "store", "partial"), capsys)
    assert f"weights {str(path)!r} do not match the model" in err
    assert "The closest reading, took `state_dict`, stripped `model.`, matches 11 of 12 model keys" in err
    assert "missing keys ['head.bias']" in err and "a partial load is never done" in err
    assert not (tmp_path / "store").exists()


def test_no_detect_suggests_the_prefix_fix(originals, tmp_path, capsys):
    source = write_data_parallel(tmp_path, originals)
    err = refused(build(source, tmp_path / "store", "nodetect", "--no-detect"), capsys)
    assert f"weights {source!r} do not match the model (took the top level)" in err
    assert "Every key starts with `module.`: every model key is found when you strip `module.`: " \
           "add --strip-prefix module." in err


def test_explicit_flags_win_over_detection(originals, tmp_path, capsys):
    source = write_training_loop(tmp_path, originals)
    err = refused(build(source, tmp_path / "store", "wrong", "--strip-prefix", "model."), capsys)
    assert "do not match the model (stripped `model.`)" in err
    assert "add --checkpoint-key state_dict" in err
    err = refused(build(source, tmp_path / "store", "wrong", "--checkpoint-key", "state_dict_ema"), capsys)
    assert "checkpoint_key 'state_dict_ema'" in err and "mappings there: 'state_dict'" in err


def test_pickled_object_in_a_checkpoint_is_refused_with_the_reason(originals, tmp_path, capsys):
    """timm's train.py also saves `args` (an argparse.Namespace): that needs unpickling an object."""
    path = tmp_path / "timm_with_args.pth.tar"
    torch.save({"state_dict": originals["model"], "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    err = refused(build(str(path), tmp_path / "store", "args"), capsys)
    assert f"weights file {str(path)!r} was refused" in err
    assert "It holds a pickled `argparse.Namespace`, which would have to be unpickled (that can run code)" in err
    assert not (tmp_path / "store").exists()


class _Payload:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_inside_a_lightning_checkpoint_never_runs(originals, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    ckpt = lightning_checkpoint(originals)
    ckpt["hyper_parameters"] = {"lr": 1e-3, "callback": _Payload(str(marker))}
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    err = refused(build(str(path), tmp_path / "store", "evil"), capsys)
    assert "It holds a pickled `io.open`" in err
    assert not marker.exists()


def test_non_tensor_among_the_chosen_weights_is_refused(originals, tmp_path, capsys):
    path = tmp_path / "mixed.pth"
    torch.save({**originals["model"], "epoch": 3}, path)
    err = refused(build(str(path), tmp_path / "store", "mixed"), capsys)
    assert "'epoch' sit among the weights (took the top level) but are int, not tensors" in err


def test_errors_name_the_users_file_never_a_staged_copy(originals, tmp_path, capsys):
    source = write_lightning(tmp_path, originals)
    argv = build(source, tmp_path / "store", "fit")
    argv[argv.index("--model-kwargs") + 1] = '{"width": 20}'  # same keys, other shapes
    err = refused(argv, capsys)
    assert f"weights {source!r} do not fit the model" in err and "size mismatch" in err
    assert "mar-build-" not in err and "mar-check-" not in err


# --- dtypes ----------------------------------------------------------------------------------------

def test_half_precision_weights_are_cast_to_the_models_float32(originals, tmp_path, capsys):
    path = tmp_path / "fp16.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in originals["model"].items()}, path)
    assert main(build(str(path), tmp_path / "store", "fp16")) == 0
    assert "weights: cast 12 float16 tensors to float32 (the model's dtype)" in capsys.readouterr().err
    mar = str(tmp_path / "store" / "fp16.mar")
    name, data, _ = archived_weights(mar)
    assert all(t.dtype == torch.float16 for t in read_tensors(name, data).values())  # half the bytes, as given
    # the reference: torch's own strict load copies the float16 values into the float32 model
    np.testing.assert_allclose(served(mar, "fp16"), reference(str(path)), rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_keep_their_dtype_when_asked(originals, tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16().contiguous() for k, v in originals["model"].items()}, str(path))
    assert main(build(str(path), tmp_path / "store", "bf16", "--keep-dtype")) == 0
    said = capsys.readouterr().err
    assert "weights: model converted to bfloat16, the weights' dtype" in said and "cast " not in said
    mar = str(tmp_path / "store" / "bf16.mar")
    _, _, handler = archived_weights(mar)
    assert handler["keep_weights_dtype"] is True
    # the reference: float32 compute over the same bf16-rounded values; bf16 compute differs a little
    model = load_reference_model(MODEL_FILE, "NestedNet", None, KWARGS)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)))
    expected = reference_embeddings(model, LAYER, IMAGES)
    got = served(mar, "bf16")
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.05 * scale
    assert np.abs(got - expected).max() > 1e-6 * scale  # it really ran in bfloat16


def test_keep_dtype_converts_the_model_and_its_inputs(originals, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in originals["model"].items()}, path)
    model = load_model(MODEL_FILE, "NestedNet", str(path), KWARGS, unwrap_options=UnwrapOptions(keep_dtype=True))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model(torch.from_numpy(IMAGES)).dtype == torch.float16  # a float32 batch is cast on the way in
    cast = load_model(MODEL_FILE, "NestedNet", str(path), KWARGS)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}


# --- detection rules, directly ---------------------------------------------------------------------

def test_ddp_around_a_compiled_model_and_settings_as_handler_options(originals):
    keys = list(originals["model"])
    found = unwrap({"model": _prefixed(originals["model"], "module._orig_mod.")}, keys)
    assert found.reading.path == ("model",) and found.reading.prefix == "module._orig_mod."
    with pytest.raises(ConfigError, match="several complete sets"):
        unwrap({"a": originals["model"], "b": originals["ema"]}, keys)
    chosen = unwrap({"a": originals["model"], "b": originals["ema"]}, keys, UnwrapOptions(checkpoint_key="b"))
    assert chosen.state["head.bias"] is originals["ema"]["head.bias"] and chosen.ignored == ["a"]


def test_sharded_index_with_a_missing_shard_names_it(originals, tmp_path, capsys):
    index = write_sharded(tmp_path, originals)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    err = refused(build(index, tmp_path / "store", "sh"), capsys)
    assert f"names shard 'model-00002-of-00002.safetensors', but {str(tmp_path / 'model-00002-of-00002.safetensors')!r}" \
           " does not exist" in err


def test_a_handmade_archive_unwraps_at_load_with_handler_settings(originals, tmp_path):
    """The worker honours checkpoint_key / strip_prefix too (an archive made without build_mar.py)."""
    import shutil

    from image_embedder.encoder import ImageEncoder
    from image_embedder.settings import EncoderSettings

    source = write_lightning(tmp_path, originals)
    shutil.copy(MODEL_FILE, tmp_path / "nested_net.py")
    settings = EncoderSettings.from_mapping({
        "model_definition_file": "nested_net.py", "model_class_name": "NestedNet", "model_init_kwargs": KWARGS,
        "model_state_dict_path": os.path.basename(source), "layer_name": LAYER,
        "checkpoint_key": "state_dict", "strip_prefix": "model.", "checkpoint_detect": False,
    })
    encoder = ImageEncoder(settings, str(tmp_path))
    np.testing.assert_allclose(encoder.embed(IMAGES), reference(originals["model_file"]), rtol=1e-5, atol=1e-5)


# --- one real TorchServe ---------------------------------------------------------------------------

@pytest.mark.server
def test_real_torchserve_serves_lightning_and_sharded_archives(originals, tmp_path, capsys):
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    store = tmp_path / "store"
    assert main(build(write_lightning(tmp_path, originals), store, "lightning")) == 0
    assert main(build(write_sharded(tmp_path, originals), store, "sharded")) == 0
    capsys.readouterr()
    expected = reference(originals["model_file"])
    with TorchServe(str(store), "lightning=lightning.mar,sharded=sharded.mar") as server:
        for name in ("lightning", "sharded"):
            server.wait_for_workers(name)
            r = requests.post(f"{server.inference_url}/predictions/{name}", data=npy_bytes(IMAGES),
                              headers=server.headers(**{"Content-Type": "application/x-npy"}), timeout=60)
            assert r.status_code == 200, r.text
            assert r.headers["Content-Type"].startswith("application/json")
            np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting, value, message", [
    ("strip_prefix", 3, "strip_prefix must be a string, got 3"),
    ("checkpoint_key", ["state_dict"], "checkpoint_key must be a string"),
    ("checkpoint_detect", "no", "checkpoint_detect must be true or false, got 'no'"),
    ("keep_weights_dtype", 1, "keep_weights_dtype must be true or false, got 1"),
])
def test_weights_settings_are_checked(setting, value, message):
    from image_embedder.settings import EncoderSettings

    # ValueError: InProcessModel re-imports image_embedder from each archive, so ConfigError may be another copy
    with pytest.raises(ValueError, match=message):
        EncoderSettings.from_mapping({"model_definition_file": "m.py", "model_class_name": "M", setting: value})
