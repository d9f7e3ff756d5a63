"""Search a LanceDB table written by `embed --format lance` with images embedded by the same server.

    image-embedder search out/digits-store query.png other.png -k 10 --key-file key_file.json

Each query image (PNG/JPEG, or a .npy of one image or a batch) is embedded as the table's vectors
were (the model, dtype and dimensions its run recorded in done.json, unless given here), and its k
nearest rows are printed under its name as `name distance` lines, nearest first: cosine distance for
float vectors, Hamming distance (bits) for binary ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from image_embedder_client import EmbeddingClient, EmbeddingError, TokenError
from image_embedder_tools import lance_store
from image_embedder_tools.embed import (DONE, ClientError, add_server_arguments, check_server_arguments, client_options,
                                        embed_batch, list_items)


def recorded_run(folder: str) -> dict:
    """What `embed --format lance` recorded about the table in `folder`."""
    try:
        with open(os.path.join(folder, DONE)) as f:
            run = json.load(f)
    except (OSError, ValueError) as exc:
        raise ClientError(f"{folder!r} holds no finished `embed --format lance` run ({DONE} is missing)") from exc
    if run.get("format") != "lance":
        raise ClientError(f"{folder!r} was written with --format {run.get('format', 'npy')}; search reads --format lance")
    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="the --out folder of an `embed --format lance` run")
    parser.add_argument("queries", nargs="+", help="images (PNG/JPEG), .npy files or folders of them")
    parser.add_argument("-k", type=int, default=10, help="rows per query")
    add_server_arguments(parser, model_default=None)
    args = parser.parse_args(argv)
    check_server_arguments(args, parser)
    if args.k < 1:
        parser.error("-k must be at least 1")
    try:
        run = recorded_run(args.store)
        distance = lance_store.distance_for(run.get("dtype"))
        items = list_items(args.queries)
        options = client_options(args, model=args.model or run.get("model"))
        with EmbeddingClient.from_options(options) as client:
            vectors = [row for start in range(0, len(items), options.batch_size)
                       for row in embed_batch(client, items[start: start + options.batch_size], run.get("dtype"),
                                              run.get("dimensions"))]
        for item, nearest in zip(items, lance_store.search(args.store, vectors, args.k, distance)):
            print(item.name)
            for name, value in nearest:
                print(f"  {name} {value:.6g}")
    except (ClientError, TokenError, EmbeddingError, lance_store.StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
