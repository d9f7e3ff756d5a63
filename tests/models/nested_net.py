"""A ResNet-shaped toy: `features.0`, `layer3.1.conv2` (followed by an in-place ReLU) and a 2-D `head`.

Its `__main__` block must never run when the encoder imports it; it writes the weights when a test
runs it as a script, and with MARK_MAIN_RAN set it leaves a file saying it ran.
"""
import os
import sys

import torch
import torch.nn as nn


class Block(nn.Module):
    """conv -> in-place ReLU -> conv -> in-place ReLU: the second ReLU overwrites conv2's output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out)


class NestedNet(nn.Module):
    def __init__(self, width: int = 6, classes: int = 5, log_batches: bool = False) -> None:
        super().__init__()
        self.log_batches = log_batches
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True))
        self.layer3 = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_batches:  # lets server tests see TorchServe's batches in the worker log
            print(f"NESTEDNET_FORWARD_BATCH={x.shape[0]}", flush=True)
        x = self.layer3(self.features(x))
        return self.head(x.mean(dim=(2, 3)))


def helper_not_a_model() -> int:
    return 42


if __name__ == "__main__":
    marker = os.environ.get("MARK_MAIN_RAN")
    if marker:
        open(marker, "w").write("ran")
    else:
        torch.manual_seed(1)
        torch.save(NestedNet().state_dict(), sys.argv[1])
