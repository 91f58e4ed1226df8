"""Model definitions shared by training and the daemon.

Small modules, top to bottom, and a name -> constructor registry. A bundle's
manifest names the architecture and its arguments; `build_fusion_head` rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std with statistics fixed at training time."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLPFusion(nn.Module):
    """Concatenate standardized modality embeddings, then a two-layer MLP to logits."""

    def __init__(self, dims: dict[str, int], num_outputs: int, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.modalities = sorted(dims)
        self.standardize = nn.ModuleDict({m: Standardize(dims[m]) for m in self.modalities})
        self.mlp = nn.Sequential(
            nn.Linear(sum(dims.values()), hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.standardize[m](features[m]) for m in self.modalities]
        return self.mlp(torch.cat(parts, dim=-1))


FUSION_HEADS = {
    "mlp": MLPFusion,
}


def build_fusion_head(arch: str, dims: dict[str, int], num_outputs: int, **kwargs) -> nn.Module:
    if arch not in FUSION_HEADS:
        raise KeyError(f"unknown fusion head {arch!r}; known: {', '.join(sorted(FUSION_HEADS))}")
    return FUSION_HEADS[arch](dims, num_outputs, **kwargs)
