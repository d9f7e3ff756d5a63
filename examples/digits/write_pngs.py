"""Write the digits as PNG files, the way a user's catalogue would lie on disk: `train/` (the images a
store holds) and `held-out/` (the queries), each named `<index>-<label>.png`.

    .venv/bin/python examples/digits/write_pngs.py out/digits/png
"""
from __future__ import annotations

import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import split  # noqa: E402


def write(folder: str) -> None:
    for part, (images, labels) in zip(("train", "held-out"), split()):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image[0]).save(os.path.join(folder, part, f"{i:04d}-{label}.png"))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "digits-png"
    write(out)
    print(f"wrote {out}/train and {out}/held-out")
