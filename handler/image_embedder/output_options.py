"""What an answer's vectors look like: their dtype and how many dimensions, per archive and per request.

The pooled float32 embedding (N, D) becomes the answer in two steps, in this order:
1. `dimensions k`: the first k dimensions (Matryoshka truncation), L2-renormalized when the archive
   normalizes (`normalize: true`), so a truncated vector is as unit-length as the full one;
2. `dtype`: float32 (as computed), float16 (the nearest half, as numpy rounds), or int8, uint8,
   binary: quantized with what the archive calibrated on the user's images (calibration.py).
An archive sets its defaults (`output_dtype`, `dimensions` in its handler settings); a request may ask
for others in its wire format's own terms or with the `Embedding-Dtype` / `Embedding-Dimensions`
headers (docs/api.md#output-options). A bad value is a 400 naming the valid ones; more dimensions
than the layer has is a 400 naming the most.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .calibration import CALIBRATED_DTYPES, Calibration, quantize, unit_rows
from .errors import bad_request

OUTPUT_DTYPES = ("float32", "float16", *CALIBRATED_DTYPES)
KIND = "InvalidOutputOption"
DTYPE_HEADER = "embedding-dtype"  # compared lower-case, as request_decoding reads headers
DIMENSIONS_HEADER = "embedding-dimensions"


@dataclass(frozen=True)
class OutputOptions:
    """A request's (or an archive's) choice; None: the next level's (request -> headers -> archive)."""

    dtype: Optional[str] = None
    dimensions: Optional[int] = None

    def over(self, fallback: "OutputOptions") -> "OutputOptions":
        """These choices, with `fallback`'s where these say None."""
        return OutputOptions(self.dtype if self.dtype is not None else fallback.dtype,
                             self.dimensions if self.dimensions is not None else fallback.dimensions)


def parse_dtype(value: Any, where: str) -> Optional[str]:
    """A requested dtype name (None when not asked), refused unless one of OUTPUT_DTYPES."""
    if value is None:
        return None
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in OUTPUT_DTYPES:
        raise bad_request(f"{where} {value!r} is not an output dtype; use one of {', '.join(OUTPUT_DTYPES)}", KIND)
    return name


def parse_dimensions(value: Any, where: str) -> Optional[int]:
    """A requested number of dimensions (None when not asked): a positive integer (text from a header)."""
    if value is None:
        return None
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
        raise bad_request(f"{where} must be a positive integer, got {value!r}", KIND)
    return number


def from_keys(doc: Any, where: str) -> OutputOptions:
    """`embedding_dtype` and `dimensions` of a JSON object (our JSON bodies, KServe v2 `parameters`)."""
    if not isinstance(doc, dict):
        return OutputOptions()
    return OutputOptions(parse_dtype(doc.get("embedding_dtype"), f"{where}embedding_dtype"),
                         parse_dimensions(doc.get("dimensions"), f"{where}dimensions"))


def from_headers(headers: Any) -> OutputOptions:
    """The Embedding-Dtype / Embedding-Dimensions headers of any request."""
    text = {name: headers.get(name) if isinstance(headers.get(name), str) else None
            for name in (DTYPE_HEADER, DIMENSIONS_HEADER)}
    return OutputOptions(parse_dtype(text[DTYPE_HEADER], "Embedding-Dtype"),
                         parse_dimensions(text[DIMENSIONS_HEADER], "Embedding-Dimensions"))


def shape_output(embeddings: np.ndarray, options: OutputOptions, normalized: bool,
                 calibration: Optional[Calibration] = None) -> np.ndarray:
    """(N, D) float32 embeddings as `options` ask (None: float32, all D); the quantized dtypes need the
    archive's `calibration`."""
    width = embeddings.shape[1]
    k = options.dimensions
    if k is not None and k != width:
        if k > width:
            raise bad_request(f"dimensions {k}: this archive's embeddings have {width}; ask for at most {width}", KIND)
        embeddings = embeddings[:, :k]
        if normalized:
            embeddings = unit_rows(embeddings)
    dtype = options.dtype or "float32"
    if dtype in CALIBRATED_DTYPES:
        if calibration is None:
            raise bad_request(f"dtype {dtype} needs an archive built with --calibration; this one answers "
                              f"{', '.join(d for d in OUTPUT_DTYPES if d not in CALIBRATED_DTYPES)}", KIND)
        return quantize(embeddings, dtype, calibration, normalized)
    return embeddings.astype(dtype, copy=False)
