"""Request bodies the tests and the bench send: `.npy` bytes and encoded images."""
from __future__ import annotations

import io

import numpy as np


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """`array` as a `.npy` file's bytes; with `allow_pickle`, an object array pickled (a hostile body)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def encoded_image(array: np.ndarray, fmt: str, quality: int, exif_orientation: int = 0) -> bytes:
    """`array` (H,W,C uint8) as a PNG/JPEG file, optionally with an EXIF orientation tag."""
    from PIL import Image

    kwargs: dict = {"quality": quality} if fmt == "JPEG" else {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()
