"""scikit-learn's labelled digits as images, split once (seeded) into the images a model trains on
and the held-out images that measure it, and the retrieval quality of embeddings against labels."""
from __future__ import annotations

import numpy as np

HELD_OUT = 0.2
SEED = 0


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 1, 8, 8) uint8 pixels 0..255 and their labels 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.clip(data.images * 16, 0, 255).astype(np.uint8)[:, None]
    return pixels, data.target.astype(np.int64)


def split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (held-out images, labels)): a seeded, stratified split."""
    from sklearn.model_selection import train_test_split

    pixels, labels = digits()
    a, b, la, lb = train_test_split(pixels, labels, test_size=HELD_OUT, random_state=SEED, stratify=labels)
    return (a, la), (b, lb)


def distances(vectors: np.ndarray, packed: bool = False) -> np.ndarray:
    """Pairwise distances: Hamming for `packed` binary codes (a `binary` answer: uint8, 8 dimensions a
    byte), else 1 - cosine (int8/uint8 codes taken as numbers)."""
    if packed:
        bits = np.unpackbits(vectors, axis=1).astype(np.float32)
        return bits.shape[1] - bits @ bits.T - (1 - bits) @ (1 - bits).T
    x = vectors.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return 1 - x @ x.T


def retrieval(dist: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """Leave-one-out over a set: for each image, the k nearest others. mAP@k (relevant: same label)
    and k-NN accuracy (the most common label among the k, ties to the nearest)."""
    dist = dist.copy()
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    relevant = labels[order] == labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    precision_at = hits / np.arange(1, k + 1)
    ap = (precision_at * relevant).sum(axis=1) / np.maximum(relevant.sum(axis=1), 1)
    votes = np.array([np.bincount(row, minlength=10) for row in labels[order]])
    accuracy = (votes.argmax(axis=1) == labels).mean()
    return {"map@10": float(ap.mean()), "knn@10": float(accuracy), "precision@10": float(relevant.mean())}
