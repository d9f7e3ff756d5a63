"""A small CNN for scikit-learn's handwritten digits (8x8, grey): `embedding` (64-d, after its ReLU)
is the layer served; `classify` only trains it. Train with train.py."""
import torch.nn as nn

# Images are 8x8 grey pixels 0..255 (the digits' 0..16 times 16, as train.py writes them).
IMAGE_PREPROCESSING = {"scale": 1 / 255, "color_mode": "L"}


class DigitsNet(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, width), nn.ReLU())
        self.classify = nn.Linear(width, 10)

    def forward(self, x):
        return self.classify(self.embedding(self.features(x)))
