"""The image-embedder's Python client: arrays or encoded images in, (N, D) float32 embeddings out.

    from image_embedder_client import EmbeddingClient

    client = EmbeddingClient("http://127.0.0.1:8080", "encoder", key_file="key_file.json")
    emb = client.embed(images)

It runs where the requests come from and needs numpy and requests only (`pip install ./client`);
the manual is client.py's docstring and docs/client.md.
"""
from image_embedder_client.client import (ClientOptions, EmbeddingClient, EmbeddingError, TokenError, encode_batch,
                                          flatten_images, load_npy)

__all__ = ["ClientOptions", "EmbeddingClient", "EmbeddingError", "TokenError", "encode_batch", "flatten_images",
           "load_npy"]
