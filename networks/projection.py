"""The text projection head: frozen text-encoder embeddings to the image embedding space."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """p = Linear(x); y = LayerNorm(Dropout(Linear(GELU(p))) + p).

    Parameter order (which buffer snapshots follow): projection.weight, projection.bias,
    fc.weight, fc.bias, layer_norm.weight, layer_norm.bias.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)
