"""Retrieval quality of a served digits model against the labels, for each output option: every
held-out digit queries the others (leave-one-out), as digits.retrieval measures it.

    .venv/bin/python examples/digits/evaluate.py --url http://127.0.0.1:8080 --key-file key_file.json \\
        --model digits --whitened digits-white --whitened digits-white-full --weights out/digits/digits.pth

`--model` is an archive of DigitsNet's `embedding` layer built with --calibration (so it answers every
dtype), `--whitened` the same built with --whiten D/4; `--weights` adds the model in this process
(a forward hook on the layer) as the first row, the figure the served float32 must equal.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import distances, retrieval, split  # noqa: E402

Embed = Callable[..., np.ndarray]  # (images, dtype=, dimensions=) -> vectors


def in_process(weights: str, images: np.ndarray) -> np.ndarray:
    """The `embedding` layer's output for `images`, by a forward hook on the trained model."""
    import torch

    from model import DigitsNet

    model = DigitsNet()
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    seen = []
    handle = model.embedding.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.from_numpy(images.astype(np.float32) / 255))
    handle.remove()
    return seen[0].numpy()


def quality(embed: Embed, whitened: dict[str, Embed], images: np.ndarray, labels: np.ndarray,
            reference: Optional[np.ndarray] = None) -> dict[str, dict[str, float]]:
    """Each variant's retrieval figures (and its bytes per vector), in process first when given;
    `whitened` names the whitened archives' rows."""
    rows: dict[str, dict[str, float]] = {}

    def add(name: str, vectors: np.ndarray, packed: bool = False) -> None:
        rows[name] = {**retrieval(distances(vectors, packed), labels), "bytes": int(vectors[0].nbytes)}

    if reference is not None:
        add("in process float32", reference)
    full = embed(images)
    width = full.shape[1]
    add("served float32", full)
    add("float16", embed(images, dtype="float16"))
    add("int8", embed(images, dtype="int8"))
    add("binary", embed(images, dtype="binary"), packed=True)
    add(f"float32 first {width // 4}", embed(images, dimensions=width // 4))
    for name, embed_whitened in whitened.items():
        add(name, embed_whitened(images, dtype="float32"))
    return rows


def label(name: str, description: dict) -> str:
    """A whitened archive's row: its name and what `describe` says it was built with."""
    calibration = description["output"]["calibration"]
    return f"{name}: whitened to {calibration['whiten']}, power {calibration['whiten_power']:g}"


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| vectors | bytes | mAP@10 | 10-NN accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['bytes']} | {r['map@10']:.3f} | {r['knn@10']:.3f} |" for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from image_embedder_client import EmbeddingClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--key-file", default="key_file.json")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--whitened", action="append", default=[], help="an archive built with --whiten (repeatable)")
    parser.add_argument("--weights", help="the trained state_dict: adds the model in process")
    args = parser.parse_args(argv)
    _, (images, labels) = split()
    reference = in_process(args.weights, images) if args.weights else None
    clients = {name: EmbeddingClient(args.url, name, key_file=args.key_file) for name in [args.model, *args.whitened]}
    try:
        whitened = {label(name, clients[name].describe()): clients[name].embed for name in args.whitened}
        rows = quality(clients[args.model].embed, whitened, images, labels, reference)
    finally:
        for client in clients.values():
            client.close()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
