"""A model whose forward needs a third-party package, einops: the build and every worker must import it.

Patches to tokens with `einops.rearrange`, then two linear layers: (N, 3, H, W) -> `mix`: (N, T, 8), T the
number of 4x4 patches. Run as a script it writes its weights: `python einops_net.py weights.pth`.
"""
import torch
import torch.nn as nn
from einops import rearrange


class EinopsNet(nn.Module):
    def __init__(self, patch: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(x, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=self.patch, p2=self.patch)
        return self.mix(torch.relu(self.embed(tokens)))


if __name__ == "__main__":
    import sys

    torch.manual_seed(0)
    torch.save(EinopsNet().state_dict(), sys.argv[1])
