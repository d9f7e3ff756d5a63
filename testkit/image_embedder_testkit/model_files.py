"""Model definition files made for a test: the example model with a few lines of its own appended."""
from __future__ import annotations

import os

from image_embedder_testkit.checkout import EXAMPLE_MODEL


def example_with(folder: str, name: str, source: str) -> str:
    """`<folder>/<name>.py`: the example's CustomModel file, then `source`; returns its path."""
    path = os.path.join(folder, f"{name}.py")
    with open(EXAMPLE_MODEL) as src, open(path, "w") as dst:
        dst.write(src.read() + "\n\n" + source.strip() + "\n")
    return path
