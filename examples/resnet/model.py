"""torchvision's ResNet-18 and ResNet-50 layouts in plain torch.nn: the README's torchvision-style
model and the bench's (torchvision does not import with this project's torch).

Same module names as torchvision's (`layer4` is the usual tap: 512 or 2048 channels, 7x7 for a
3x224x224 image). Only torch is imported, so the file is an archive's model definition as it is.

    python examples/resnet/model.py out/resnet18.pth [ResNet50]   # random weights, seeded
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def projection(cin: int, cout: int, stride: int) -> Optional[nn.Module]:
    """ResNet's shortcut: a strided 1x1 convolution where the block changes shape, else none (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet's basic block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 down, 3x3, 1x1 up (x4) with batch norm and a residual connection (ResNet-50's block)."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18's layout: stem, four stages of two basic blocks, avgpool, fc."""

    blocks = (2, 2, 2, 2)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), self.blocks)):
            stage = []
            for j in range(count):
                stage.append(self._block(cin, width, (1 if i == 0 else 2) if j == 0 else 1))
                cin = stage[-1].conv2.out_channels * (4 if isinstance(stage[-1], Bottleneck) else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    @staticmethod
    def _block(cin: int, width: int, stride: int) -> nn.Module:
        return BasicBlock(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet50(ResNet18):
    """ResNet-50's layout: bottleneck blocks 3/4/6/3, 2048 channels at layer4."""

    blocks = (3, 4, 6, 3)

    @staticmethod
    def _block(cin: int, width: int, stride: int) -> nn.Module:
        return Bottleneck(cin, width, stride)


def make_weights(path: str, seed: int = 0, model_class: type = ResNet18) -> str:
    """Random weights (with non-trivial batch-norm statistics) saved as a state_dict at `path`."""
    torch.manual_seed(seed)
    model = model_class()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else "resnet18.pth"
    make_weights(path, model_class={"ResNet18": ResNet18, "ResNet50": ResNet50}[sys.argv[2] if len(sys.argv) > 2 else "ResNet18"])
    print(f"wrote {path}")
