"""A model file importing a package this project never installs (termcolor): it serves only where TorchServe
installs the archive's requirements file itself (install_py_dep_per_model=true)."""
import torch
import torch.nn as nn
from termcolor import colored


class ColoredNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def extra_repr(self) -> str:
        return colored("imports termcolor", "green")
