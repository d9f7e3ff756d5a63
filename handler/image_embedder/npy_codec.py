"""numpy's .npy format, read straight over the request buffer and written in one piece.

The header is parsed and checked before anything is allocated: a header that claims more data
than the body holds, an object or structured dtype, or a pickled payload is refused, and the
array is a zero-copy view of the body.
"""
from __future__ import annotations

import io
import math

import numpy as np

from .errors import bad_request

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000


def read_npy(body: bytes | bytearray | memoryview) -> np.ndarray:
    """A view of the array stored in `body`; RequestError (400) when it is not a plain numeric .npy."""
    view = memoryview(body)
    if view.nbytes < 10 or bytes(view[:6]) != NPY_MAGIC:
        raise bad_request("body is not a .npy file (it does not start with the \\x93NUMPY magic)", "InvalidNpy")
    stream = io.BytesIO(view[: min(view.nbytes, MAX_HEADER_BYTES + 16)])
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:
        raise bad_request(f".npy header is invalid: {exc}", "InvalidNpy") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise bad_request(
            f".npy holds dtype {dtype.descr if dtype.fields else dtype}; object, structured and pickled arrays "
            "are refused (nothing is ever unpickled)",
            "UnsupportedDtype",
        )
    if dtype.kind not in "biufc" or dtype.itemsize == 0:  # strings, bytes, void, dates: not pixel data
        raise bad_request(
            f".npy holds dtype {dtype}; only numeric arrays are read (supported: uint8, float16, float32, float64)",
            "UnsupportedDtype",
        )
    if any(d < 0 for d in shape):
        raise bad_request(f".npy header has a negative dimension in shape {shape}", "InvalidNpy")
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**62:  # numpy can't even describe it, empty or not
        raise bad_request(f".npy header promises shape {shape} of {dtype}, too large for any array", "InvalidNpy")
    offset = stream.tell()
    count = math.prod(shape)
    expected = count * dtype.itemsize
    available = view.nbytes - offset
    if available != expected:
        raise bad_request(
            f".npy header promises shape {shape} of {dtype} ({expected} bytes) but the body holds {available} bytes",
            "InvalidNpy",
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    if not dtype.isnative:  # torch reads native byte order only: one bounded copy
        flat = flat.astype(dtype.newbyteorder("="))
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def write_npy(array: np.ndarray) -> bytes:
    """The array as .npy bytes (version 1.0, C order)."""
    array = np.ascontiguousarray(array)
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    out.write(array.tobytes())
    return out.getvalue()
