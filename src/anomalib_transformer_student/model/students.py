"""The student network: a shallow MLP that maps one teacher depth to another, token by token."""

from __future__ import annotations

import torch
from torch import nn


class StudentMLP(nn.Module):
    """Three linear layers with GELU in between; no normalisation, no residual.

    Each student works on single tokens, so it sees neither neighbours nor position: a
    patch whose mapping between the two teacher depths is unusual cannot be explained
    away by context.

    Args:
        embed_dim: Width of the teacher's tokens; input, hidden and output widths all equal it.

    Example:
        >>> student = StudentMLP(embed_dim=768)
        >>> student(torch.randn(2, 5476, 768)).shape
        torch.Size([2, 5476, 768])
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens of shape ``(..., embed_dim)`` to predicted tokens of the same shape."""
        return self.layers(tokens)
