"""ImageNet's input normalization, the one copy the tests and the bench use: pixels scaled to [0, 1],
then per channel (R, G, B) minus `MEAN` over `STD`, as torchvision's pretrained models expect."""
from __future__ import annotations

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGENET = {"scale": 1 / 255, "mean": list(MEAN), "std": list(STD)}  # EncoderSettings fields
