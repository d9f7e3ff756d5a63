"""Train DigitsNet on the digits' training split (seeded, a few seconds on a CPU); write its weights
(digits.pth) and the training images (digits-train.npy, the archive's --calibration) into a folder.

    .venv/bin/python examples/digits/train.py out/digits
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import SEED, split  # noqa: E402
from model import DigitsNet  # noqa: E402

EPOCHS = 15


def train(folder: str) -> float:
    """Write the trained state_dict and the training images into `folder`; returns the held-out
    classification accuracy."""
    torch.manual_seed(SEED)
    (images, labels), (held_out, held_labels) = split()
    x = torch.from_numpy(images.astype(np.float32) / 255)
    y = torch.from_numpy(labels)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(held_out.astype(np.float32) / 255)).argmax(dim=1).numpy()
    os.makedirs(folder, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(folder, "digits.pth"))
    np.save(os.path.join(folder, "digits-train.npy"), images)
    return float((predicted == held_labels).mean())


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "digits"
    accuracy = train(out)
    print(f"wrote {out}/digits.pth and {out}/digits-train.npy: held-out accuracy {accuracy:.3f}")
