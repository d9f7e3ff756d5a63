"""`embed --format lance` and `image-embedder search` against a real TorchServe serving the digits
example (token auth on): the training digits go into a LanceDB table through the resumable run, the
held-out digits (as PNG files) search it, and the rows found are mostly the query's own digit, as
many as the model in this process finds (precision@10 within 0.05); binary vectors by Hamming
distance; the dtypes LanceDB can't search are refused before anything is sent."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.ts_server import TorchServe, java_available

DIGITS = os.path.join(REPO, "examples", "digits")
sys.path.insert(0, DIGITS)
from digits import split  # noqa: E402
from evaluate import in_process  # noqa: E402

pytestmark = pytest.mark.server
QUERIES = 40


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "image_embedder_tools.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def digits_server(digits_archives, tmp_path_factory):
    if not java_available():
        pytest.fail("TorchServe needs Java 17")
    folder = digits_archives["folder"]
    server = TorchServe(str(digits_archives["store"]), "digits=digits.mar")
    server.start()
    (_, _), (held_out, _) = split()
    queries = folder / "queries"
    queries.mkdir(exist_ok=True)
    for i, image in enumerate(held_out[:QUERIES]):
        Image.fromarray(image[0]).save(queries / f"q{i:03d}.png")
    yield server, folder
    server.cleanup()


def server_flags(server) -> list[str]:
    return ["--url", server.inference_url, f"--token={server.keys['inference']}"]


def searched(output: str) -> dict[str, list[tuple[str, float]]]:
    """`search`'s output: each query's name, then its rows as indented `name distance` lines."""
    found: dict[str, list[tuple[str, float]]] = {}
    rows: list[tuple[str, float]] = []
    for line in output.splitlines():
        if line.startswith("  "):
            name, distance = line.split()
            rows.append((name, float(distance)))
        else:
            rows = found[line.strip()] = []
    return found


def label_of(name: str, labels: np.ndarray) -> int:
    return int(labels[int(re.fullmatch(r"digits-train\.npy\[(\d+)\]", name).group(1))])


def test_embed_into_lance_resumes_and_search_finds_the_digit(digits_server):
    server, folder = digits_server
    (train_images, train_labels), (held_out, held_labels) = split()
    out = folder / "store"
    args = ["embed", str(folder / "digits-train.npy"), "--out", str(out), "--model", "digits", "--format", "lance",
            "--batch-size", "256", "--quiet", *server_flags(server)]
    first = cli(*args, "--max-batches", "2", "--concurrency", "1")
    assert first.returncode == 0 and not json.loads(first.stdout)["complete"], first.stderr
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["complete"] and summary["resumed"] == 512 and summary["outputs"] == [str(out / "embeddings.lance")]

    result = cli("search", str(out), str(folder / "queries"), "-k", "10", *server_flags(server))
    assert result.returncode == 0, result.stderr
    found = searched(result.stdout)
    assert sorted(found) == [f"q{i:03d}.png" for i in range(QUERIES)]
    assert all(len(rows) == 10 and [d for _, d in rows] == sorted(d for _, d in rows) for rows in found.values())
    served = np.mean([[label_of(name, train_labels) == held_labels[i] for name, _ in found[f"q{i:03d}.png"]]
                      for i in range(QUERIES)])

    reference = in_process(str(folder / "digits.pth"), train_images)
    queries = in_process(str(folder / "digits.pth"), held_out[:QUERIES])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argsort(-(unit(queries) @ unit(reference).T), axis=1)[:, :10]
    expected = np.mean(train_labels[nearest] == held_labels[:QUERIES, None])
    print(f"precision@10: served through LanceDB {served:.3f}, in process {expected:.3f}")
    assert expected > 0.9 and abs(served - expected) <= 0.05


def test_binary_vectors_are_searched_by_hamming_distance(digits_server):
    server, folder = digits_server
    (_, train_labels), (_, held_labels) = split()
    out = folder / "binary"
    made = cli("embed", str(folder / "digits-train.npy"), "--out", str(out), "--model", "digits", "--format", "lance",
               "--dtype", "binary", "--batch-size", "512", "--quiet", *server_flags(server))
    assert made.returncode == 0, made.stderr
    result = cli("search", str(out), str(folder / "queries" / "q000.png"), str(folder / "queries" / "q001.png"),
                 "-k", "10", *server_flags(server))
    assert result.returncode == 0, result.stderr
    found = searched(result.stdout)
    for i, rows in enumerate(found[f"q{i:03d}.png"] for i in range(2)):
        assert all(d == int(d) and 0 <= d <= 64 for _, d in rows), rows  # whole bits of 64
        assert np.mean([label_of(name, train_labels) == held_labels[i] for name, _ in rows]) >= 0.7, rows


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_dtypes_lancedb_cannot_search_are_refused_before_sending(digits_server, dtype):
    server, folder = digits_server
    result = cli("embed", str(folder / "queries"), "--out", str(folder / f"no-{dtype}"), "--model", "digits",
                 "--format", "lance", "--dtype", dtype, "--quiet", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1 and f"can't search {dtype}" in result.stderr and "float16" in result.stderr
