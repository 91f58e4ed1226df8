"""Model definitions shared by training and the daemon.

Small modules, top to bottom, and name -> constructor registries. A bundle's
manifest names each architecture and its arguments; the bundle rebuilds them.

Stage 1 (ADMC): one `ModalityEncoder` per modality, trained alone with its own
`SingleModalityHead`, then frozen. Stage 2: restorers work in that embedding space
(`mmfuse.restorers`). Stage 3: a `FusionHead` on the M embeddings, optionally with
the session context (mean of the previous windows' embeddings).
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


class ModalityEncoder(nn.Module):
    """Raw features of one modality -> embedding of the common size."""

    def __init__(self, in_dim: int, embed_dim: int = 64, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.standardize = Standardize(in_dim)
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
            nn.LayerNorm(embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


class SingleModalityHead(nn.Module):
    """Stage-1 head that trains one encoder alone; not used after stage 1."""

    def __init__(self, embed_dim: int, num_outputs: int, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_outputs))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class FusionHead(nn.Module):
    """MLP over the concatenated modality embeddings [B, M, E] (+ context [B, M, E])."""

    def __init__(self, num_modalities: int, embed_dim: int, num_outputs: int, hidden: int = 128,
                 dropout: float = 0.3, context: int = 0):
        super().__init__()
        self.context = context
        width = num_modalities * embed_dim * (2 if context else 1)
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        parts = [z.flatten(1)]
        if self.context:
            parts.append((context if context is not None else torch.zeros_like(z)).flatten(1))
        return self.net(torch.cat(parts, dim=-1))


class ResidualAutoencoder(nn.Module):
    """One block of MMIN's cascaded residual autoencoder."""

    def __init__(self, width: int, hidden: int, bottleneck: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck), nn.GELU(),
            nn.Linear(bottleneck, hidden), nn.GELU(),
            nn.Linear(hidden, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CascadedResidualAutoencoder(nn.Module):
    """Imagines missing embeddings from the present ones (MMIN, Zhao et al. 2021).

    Input: embeddings [B, M, E] with missing rows zeroed and the presence mask [B, M].
    Each block adds a correction to the running estimate; present embeddings are
    put back unchanged at the end.
    """

    def __init__(self, num_modalities: int, embed_dim: int, blocks: int = 3, hidden: int = 256,
                 bottleneck: int = 64):
        super().__init__()
        width = num_modalities * embed_dim
        self.mask_embedding = nn.Linear(num_modalities, width)
        self.blocks = nn.ModuleList(ResidualAutoencoder(width, hidden, bottleneck) for _ in range(blocks))

    def forward(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        keep = present.unsqueeze(-1).to(z.dtype)
        estimate = (z * keep).flatten(1)
        condition = self.mask_embedding(present.to(z.dtype))
        for block in self.blocks:
            estimate = estimate + block(estimate + condition)
        return torch.where(keep.bool(), z, estimate.view(shape))


ENCODERS = {"mlp": ModalityEncoder}
FUSION_HEADS = {"mlp": FusionHead}


def build_encoder(arch: str, **kwargs) -> nn.Module:
    if arch not in ENCODERS:
        raise KeyError(f"unknown encoder {arch!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[arch](**kwargs)


def build_fusion_head(arch: str, **kwargs) -> nn.Module:
    if arch not in FUSION_HEADS:
        raise KeyError(f"unknown fusion head {arch!r}; known: {', '.join(sorted(FUSION_HEADS))}")
    return FUSION_HEADS[arch](**kwargs)
