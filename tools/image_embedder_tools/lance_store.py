"""Embeddings in a LanceDB table (`embed --format lance`), searched by `image-embedder search`.

LanceDB runs in the process (no server) and keeps the table in a folder: `<out>/embeddings.lance`,
columns `name` (string) and `vector` (fixed-size list). It searches float32 and float16 vectors by
cosine distance and `binary` answers (uint8, 8 dimensions a byte) by Hamming distance. It does not
search int8/uint8 codes (LanceDB 0.40 refuses both for every distance): store float16 or float32 and
let a LanceDB index quantize them (IVF_PQ, IVF_SQ), or write int8/uint8 as .npy/Parquet.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

os.environ.setdefault("LANCEDB_LOG", "error")  # read once, when lancedb loads: not the warning that a table is new
TABLE = "embeddings"
SEARCHABLE = {"float32": "cosine", "float16": "cosine", "binary": "hamming"}


class StoreError(RuntimeError):
    """The store can't hold or search what was asked."""


def distance_for(dtype: Optional[str]) -> str:
    """The distance LanceDB searches vectors of `dtype` by (None: the server's default, float32)."""
    name = dtype or "float32"
    if name not in SEARCHABLE:
        raise StoreError(f"LanceDB can't search {name} vectors; use --dtype float16 (half the bytes) or binary, "
                         "or write them with --format npy or parquet")
    return SEARCHABLE[name]


def write(out: str, names: Sequence[str], vectors: np.ndarray, dtype: Optional[str]) -> str:
    """A new `embeddings` table in `out` (replacing one there) of vectors asked as `dtype` (None: the
    archive's own, which must then be a float); returns its folder."""
    if dtype is None and vectors.dtype.kind != "f":
        raise StoreError(f"the archive answers {vectors.dtype} vectors by default: say what they are with --dtype "
                         "(binary for packed bits; LanceDB searches float32, float16 and binary)")
    import lancedb
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(vectors).ravel())
    table = pa.table({"name": pa.array(list(names), pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    lancedb.connect(out).create_table(TABLE, table, mode="overwrite")
    return os.path.join(out, f"{TABLE}.lance")


def search(folder: str, queries: Sequence[np.ndarray], k: int, distance: str) -> list[list[tuple[str, float]]]:
    """For each query vector, the k rows nearest it as (name, distance), nearest first; the table is
    opened once for all of them."""
    import lancedb

    table = lancedb.connect(folder).open_table(TABLE)
    found = []
    for query in queries:
        rows = table.search(query, vector_column_name="vector").distance_type(distance).limit(k).to_list()
        found.append([(row["name"], float(row["_distance"])) for row in rows])
    return found
