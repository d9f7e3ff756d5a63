"""How close two sets of embeddings (or images) are, for tests and bench rows."""
from __future__ import annotations

import numpy as np


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between `a[i]` and `b[i]`, each item flattened, in float64.

    Rows are the first axis: pass `x[None]` to compare two whole arrays as one item."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
