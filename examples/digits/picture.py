"""Query digits beside their nearest neighbours in a LanceDB table written by `embed --format lance`,
as one picture: each row a query (framed) and its k nearest stored images, read back by name.

    .venv/bin/python examples/digits/picture.py out/digits/store out/digits/png/train \\
        out/digits/png/held-out/0000-*.png ... --out docs/digits-neighbours.png --key-file key_file.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np
from PIL import Image

from image_embedder_client import EmbeddingClient
from image_embedder_tools import lance_store


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="the --out folder of an `embed --format lance` run")
    parser.add_argument("images", help="the folder the stored names are relative to")
    parser.add_argument("queries", nargs="+", help="query PNG files")
    parser.add_argument("--out", required=True, help="the picture (.png)")
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--key-file", default="key_file.json")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(args.store, "done.json")) as f:
        run = json.load(f)
    with EmbeddingClient(args.url, run["model"], key_file=args.key_file) as client:
        queries = [open(path, "rb").read() for path in args.queries]
        vectors = client.embed(queries, dtype=run.get("dtype"), dimensions=run.get("dimensions"))
    distance = lance_store.distance_for(run.get("dtype"))
    figure, axes = plt.subplots(len(args.queries), args.k + 1, figsize=(args.k + 1, len(args.queries) * 1.1))
    for row, (path, found) in enumerate(zip(args.queries, lance_store.search(args.store, vectors, args.k, distance))):
        shown = [(Image.open(path), os.path.basename(path).split("-")[1].split(".")[0], None)]
        shown += [(Image.open(os.path.join(args.images, name)), name.split("-")[1].split(".")[0], d) for name, d in found]
        for col, (image, label, d) in enumerate(shown):
            ax = axes[row, col]
            ax.imshow(np.asarray(image), cmap="gray_r", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("query" if d is None else f"{label}  {d:.2f}", fontsize=7)
            if d is None:
                for spine in ax.spines.values():
                    spine.set_color("tab:blue"), spine.set_linewidth(2)
    figure.suptitle("held-out digits (left) and their nearest training digits in the LanceDB table "
                    "(label, cosine distance)", fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
