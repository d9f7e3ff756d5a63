"""scripts/embed.py end to end against a real TorchServe: a folder of images and .npy files and one
large .npy, batched and concurrent, names in order, a stopped run resumed, a finished run not redone,
retries on 503/507."""
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from image_embedder_client import ClientOptions, EmbeddingClient, load_npy
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.reference import load_reference_model, reference_embeddings
from image_embedder_testkit.scripted import scripted_embeddings, scripted_reply
from image_embedder_tools import embed

SCRIPT = os.path.join(REPO, "scripts", "embed.py")


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


def token_file(server, folder):
    path = os.path.join(folder, "key_file.json")
    with open(path, "w") as f:
        json.dump({"inference": {"key": server.keys["inference"]}}, f)
    return path


@pytest.mark.server
def test_folder_of_images_and_npy_in_order(feature_torchserve, tmp_path, example_model):
    """PNG/JPEG files and .npy files in nested folders, sent to the `images` model (resize/crop/normalize)."""
    rng = np.random.default_rng(50)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i in range(5):
        pixels = rng.integers(0, 256, (240 + 8 * i, 256, 3)).astype(np.uint8)
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        Image.fromarray(pixels).save(tmp_path / "in" / name, "PNG" if i % 2 else "JPEG")
    arrays = rng.integers(0, 256, (2, 3, 224, 224)).astype(np.uint8)
    np.save(tmp_path / "in" / "pair.npy", arrays)  # a batch file: two items, pair.npy[0] and [1]
    out = run_cli(str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--url", feature_torchserve.inference_url,
                  "--model", "images", "--key-file", token_file(feature_torchserve, str(tmp_path)),
                  "--batch-size", "3", "--concurrency", "2")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["items"] == 7 and summary["embedded"] == 7 and summary["complete"] and summary["dim"] == 10
    assert "img/s" in out.stderr  # the tqdm bar
    names = (tmp_path / "out" / "names.txt").read_text().splitlines()
    assert names == ["img0.jpg", "img2.jpg", "img4.jpg", "pair.npy[0]", "pair.npy[1]",
                     os.path.join("sub", "img1.png"), os.path.join("sub", "img3.png")]
    got = np.load(tmp_path / "out" / "embeddings.npy")
    assert got.shape == (7, 10) and got.dtype == np.float32
    assert not (tmp_path / "out" / "checkpoint").exists()
    # .npy arrays get the archive's scale/mean/std (no resize/crop: they are already 224x224)
    from image_embedder_testkit.feature_server import IMAGE_SETTINGS
    normalized = (arrays / 255.0 - np.array(IMAGE_SETTINGS["mean"])[:, None, None]) / np.array(IMAGE_SETTINGS["std"])[:, None, None]
    np.testing.assert_allclose(got[3:5], reference_embeddings(example_model, "conv1", normalized.astype(np.float32)),
                               atol=1e-5)
    # each image's row equals the server's answer for that file alone, so order and batching hold
    client = EmbeddingClient(feature_torchserve.inference_url, "images", token=feature_torchserve.keys["inference"])
    for row, name in enumerate(names):
        if name.endswith((".png", ".jpg")):
            alone = client.embed(str(tmp_path / "in" / name))
            np.testing.assert_allclose(got[row], alone[0], atol=1e-5)
    # over TorchServe's gRPC API: the same rows (batches mix encoded images and arrays: runs of each)
    grpc_url = f"grpc://127.0.0.1:{feature_torchserve.ports['grpc_inference_port']}"
    over_grpc = run_cli(str(tmp_path / "in"), "--out", str(tmp_path / "grpc"), "--url", grpc_url, "--model", "images",
                        "--key-file", token_file(feature_torchserve, str(tmp_path)), "--batch-size", "3", "--quiet")
    assert over_grpc.returncode == 0, over_grpc.stderr
    assert (tmp_path / "grpc" / "names.txt").read_text().splitlines() == names
    np.testing.assert_allclose(np.load(tmp_path / "grpc" / "embeddings.npy"), got, atol=1e-5)
    # the same command again: says it is done and sends nothing
    again = run_cli(str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--url", feature_torchserve.inference_url,
                    "--model", "images", "--token", "not-even-a-valid-token", "--batch-size", "3")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["embedded"] == 0 and "already complete" in again.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings.npy"), got)


def chlast_npy(server, folder, name, count, seed):
    """`count` random images saved as one .npy for the `chlast` model, and that model's reference."""
    files = server.chlast
    model = load_reference_model(files["model_file"], files["class"], files["state_dict"], files["kwargs"])
    images = np.random.default_rng(seed).normal(size=(count, 3, 16, 16)).astype(np.float32)
    np.save(folder / name, images)
    return model, images


def chlast_args(server, folder, name, *extra):
    return [str(folder / name), "--out", str(folder / "out"), "--url", server.inference_url, "--model", "chlast",
            f"--token={server.keys['inference']}", "--quiet", *extra]  # = : a key may start with "-"


@pytest.mark.server
def test_large_npy_stopped_and_resumed(feature_torchserve, tmp_path):
    """One (N, C, H, W) .npy: a run stopped after 2 batches leaves shards; the rerun sends only the rest."""
    model, images = chlast_npy(feature_torchserve, tmp_path, "big.npy", 23, seed=51)
    args = chlast_args(feature_torchserve, tmp_path, "big.npy", "--batch-size", "4")
    first = run_cli(*args, "--max-batches", "2", "--concurrency", "1")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["embedded"] == 8 and not summary["complete"] and "resume" in first.stderr
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint")) == ["batch-0000000.npy", "batch-0000001.npy", "plan.json"]
    assert not (tmp_path / "out" / "embeddings.npy").exists()

    second = run_cli(*args, "--concurrency", "3")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["resumed"] == 8 and summary["embedded"] == 15 and summary["complete"]
    got = np.load(tmp_path / "out" / "embeddings.npy")
    np.testing.assert_allclose(got, reference_embeddings(model, "proj", images, "avg", channel_axis=-1), atol=1e-5)
    names = (tmp_path / "out" / "names.txt").read_text().splitlines()
    assert names == [f"big.npy[{i}]" for i in range(23)]

    other = run_cli(str(tmp_path / "big.npy"), "--out", str(tmp_path / "out"), "--batch-size", "5", "--max-batches", "0",
                    "--url", feature_torchserve.inference_url, "--model", "chlast", "--quiet", "--restart")
    assert other.returncode == 0  # --restart drops the finished run: a new plan may start there
    assert json.loads(other.stdout)["resumed"] == 0 and not (tmp_path / "out" / "done.json").exists()


@pytest.mark.server
def test_parquet_output_names_and_embeddings(feature_torchserve, tmp_path):
    """--format parquet: one row per image, columns name and embedding, same order and values as .npy."""
    import pyarrow.parquet as pq  # pinned in requirements.txt
    model, images = chlast_npy(feature_torchserve, tmp_path, "five.npy", 5, seed=52)
    out = run_cli(*chlast_args(feature_torchserve, tmp_path, "five.npy", "--batch-size", "2", "--format", "parquet"))
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "out" / "embeddings.parquet").to_pydict()
    assert table["name"] == [f"five.npy[{i}]" for i in range(5)]
    np.testing.assert_allclose(np.asarray(table["embedding"], np.float32),
                               reference_embeddings(model, "proj", images, "avg", channel_axis=-1), atol=1e-5)


@pytest.mark.server
def test_wrong_token_is_a_clear_error(feature_torchserve, tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((3, 8, 8), np.float32))
    out = run_cli(str(tmp_path / "one.npy"), "--out", str(tmp_path / "out"), "--url", feature_torchserve.inference_url,
                  "--model", "chlast", "--token", "wrong", "--quiet")
    assert out.returncode == 1 and "InvalidKeyException" in out.stderr and "token refused" in out.stderr


class _Flaky(BaseHTTPRequestHandler):
    """Answers each queued status (with an optional body), then a (n, 2) .npy of the batch size;
    records what it saw."""

    answers: list = [503, (500, b'{"code": 500, "type": "InternalServerException", "message": "Worker died."}'), 507]
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = len(load_npy(io.BytesIO(body))) if body.startswith(b"\x93NUMPY") else body.count(b"\x93NUMPY")
        type(self).seen.append((self.headers.get("Authorization"), n))
        if type(self).answers:
            answer = type(self).answers.pop(0)
            scripted_reply(self, *(answer if isinstance(answer, tuple) else (answer,)))
            return
        scripted_embeddings(self, n)

    def log_message(self, *args):
        pass


def test_retries_503_507_and_lost_worker_with_backoff(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        np.save(tmp_path / "x.npy", np.zeros((3, 3, 4, 4), np.float32))
        (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k1"}}))
        client = ClientOptions(url, "m", key_file=str(tmp_path / "key_file.json"), retries=6, batch_size=3,
                               backoff=0.01)
        summary = embed.run(embed.RunSettings([str(tmp_path / "x.npy")], str(tmp_path / "out"), client,
                                              concurrency=1, quiet=True))
        assert summary["retries"] == 3 and summary["complete"]
        assert _Flaky.seen == [("Bearer k1", 3)] * 4  # the same batch of 3 images, tried four times
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings.npy"), np.full((3, 2), 7, np.float32))
        _Flaky.answers = [503] * 3
        with pytest.raises(embed.ClientError, match="HTTP 503"):  # out of retries: a clear error
            embed.run(embed.RunSettings([str(tmp_path / "x.npy")], str(tmp_path / "out2"),
                                        ClientOptions(url, "m", retries=2, batch_size=3, backoff=0.01), quiet=True))
        _Flaky.answers = [(500, b'{"code": 500, "type": "InternalError", "message": "decoding failed"}')]
        with pytest.raises(embed.ClientError, match="HTTP 500"):  # a real server error is not retried
            embed.run(embed.RunSettings([str(tmp_path / "x.npy")], str(tmp_path / "out3"),
                                        ClientOptions(url, "m", retries=2, batch_size=3, backoff=0.01), quiet=True))
    finally:
        server.shutdown()
        server.server_close()


def test_finished_run_is_not_redone_unless_an_input_changed(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Flaky.answers, _Flaky.seen = [], []
    settings = embed.RunSettings([str(tmp_path / "x.npy")], str(tmp_path / "out"),
                                 ClientOptions(f"http://127.0.0.1:{server.server_port}", "m", batch_size=2), quiet=True)
    try:
        np.save(tmp_path / "x.npy", np.zeros((3, 3, 4, 4), np.uint8))
        assert embed.run(settings)["embedded"] == 3 and len(_Flaky.seen) == 2
        again = embed.run(settings)
        assert again["already_complete"] and again["embedded"] == 0 and len(_Flaky.seen) == 2  # nothing sent
        np.save(tmp_path / "x.npy", np.ones((3, 3, 4, 5), np.uint8))  # same name, new content
        os.utime(tmp_path / "x.npy", ns=(1, 1))  # and a different mtime even on a coarse clock
        changed = embed.run(settings)
        assert changed["embedded"] == 3 and not changed.get("already_complete") and len(_Flaky.seen) == 4
        assert embed.run(embed.RunSettings(**{**settings.__dict__, "restart": True}))["embedded"] == 3
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_that_starts_with_a_dash_is_given_with_equals():
    """TorchServe's keys are URL-safe base64: one in 64 starts with "-", which argparse reads as an option
    unless it is joined with "=" (as the tests and docs/client.md give it)."""
    from image_embedder_tools.embed import parse_args

    assert parse_args(["a.npy", "--out", "o", "--token=-Ab_9"]).token == "-Ab_9"
    with pytest.raises(SystemExit):
        parse_args(["a.npy", "--out", "o", "--token", "-Ab_9"])
