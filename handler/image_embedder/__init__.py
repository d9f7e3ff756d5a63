"""Image embeddings from any PyTorch model's layer: loading, layer tap, pooling, request codecs.

Plain Python with torch and numpy; the TorchServe handler (encoder_handler.py) is a thin adapter.
"""
