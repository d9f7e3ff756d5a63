"""A ViT-shaped toy: patch tokens plus a class token; `blocks.0` gives (N, T, D), `head` gives (N, D)."""
import torch
import torch.nn as nn


class TokenNet(nn.Module):
    def __init__(self, dim: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens)
        return self.head(tokens[:, 0])
