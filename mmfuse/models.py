"""Model definitions shared by training and the daemon.

Small modules, top to bottom, and name -> constructor registries. A bundle's
manifest names each architecture and its arguments; the bundle rebuilds them.

Stage 1 (ADMC): one `ModalityEncoder` per modality, trained alone with its own
`SingleModalityHead`, then frozen. Stage 2: restorers work in that embedding space
(`mmfuse.restorers`). Stage 3: a `FusionHead` (MLP or UMCA) on the M embeddings,
optionally with the session context (mean of the previous windows' embeddings) and a
Modality Imagination Autoencoder refining the restored ones (self-distillation).
"""

from __future__ import annotations

import itertools
import math

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


class ImaginationAutoencoder(nn.Module):
    """MIA (Double-Flow Self-Distillation): a residual autoencoder over the concatenated modality embeddings,
    bottleneck half the width, its output added to its input."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class FusionHead(nn.Module):
    """A window's M embeddings [B, M, E] (+ its session context [B, M, E]) -> one fused vector -> outputs.

    With `imagination`, a MIA first refines the embeddings of the modalities `present` marks missing (the
    restorer's fill); present ones pass unchanged. Subclasses define `fuse` and `output`.
    """

    fused_dim: int

    def __init__(self, num_modalities: int, embed_dim: int, context: int = 0, imagination: bool = False):
        super().__init__()
        self.context = context
        self.imagination = ImaginationAutoencoder(num_modalities * embed_dim) if imagination else None

    def refine(self, z: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        if self.imagination is None or present is None:
            return z
        return torch.where(present.unsqueeze(-1), z, self.imagination(z.flatten(1)).view_as(z))

    def fuse(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def output(self, fused: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None,
                present: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.fuse(self.refine(z, present), context))


class MlpFusion(FusionHead):
    """MLP over the concatenated modality embeddings (and context); the fused vector is its hidden layer, before
    the output's dropout (so that two flows through it compare their features, not two dropout masks)."""

    def __init__(self, num_modalities: int, embed_dim: int, num_outputs: int, hidden: int = 128,
                 dropout: float = 0.3, context: int = 0, imagination: bool = False):
        super().__init__(num_modalities, embed_dim, context, imagination)
        self.fused_dim = hidden
        width = num_modalities * embed_dim * (2 if context else 1)
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs),
        )

    def fuse(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        parts = [z.flatten(1)]
        if self.context:
            parts.append((context if context is not None else torch.zeros_like(z)).flatten(1))
        return self.net[:3](torch.cat(parts, dim=-1))

    def output(self, fused: torch.Tensor) -> torch.Tensor:
        return self.net[3:](fused)


def modality_views(num_modalities: int) -> list[tuple[int, ...]]:
    """UMCA's multi-view queries: every non-empty set of modalities, the full set first and singles last
    (for a, v, t: avt, av, at, vt, a, v, t)."""
    return [v for size in range(num_modalities, 0, -1) for v in itertools.combinations(range(num_modalities), size)]


class UmcaFusion(FusionHead):
    """UMCA (Double-Flow Self-Distillation's fusion), adapted to one token per modality (docs/models.md).

    Each modality is projected to a shared width. A modality-weight vector comes from the pooled modalities.
    Each view (a set of modalities) has its own MLP making a query from the mean of its modalities' tokens;
    every modality's cross-attention (keys and values its own) answers every view's query over that modality's
    tokens: its window token, its session-context token when context is on, and a learned empty token, which
    lets a query decline a modality (over a single token, attention is identically 1 and a query would change
    nothing). The answers are gathered by the modality weights, then the views by attention weights, into the
    fused vector; a linear layer gives the outputs.
    """

    def __init__(self, num_modalities: int, embed_dim: int, num_outputs: int, width: int = 64,
                 dropout: float = 0.3, context: int = 0, imagination: bool = False):
        super().__init__(num_modalities, embed_dim, context, imagination)
        self.fused_dim = width
        self.views = modality_views(num_modalities)
        self.project = nn.ModuleList(nn.Linear(embed_dim, width) for _ in range(num_modalities))
        self.context_position = nn.Parameter(torch.zeros(num_modalities, width))
        self.empty = nn.Parameter(torch.randn(num_modalities, width) * 0.02)
        self.weigh = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, num_modalities))
        self.queries = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                     for _ in self.views)
        self.keys = nn.ModuleList(nn.Linear(width, width) for _ in range(num_modalities))
        self.values = nn.ModuleList(nn.Linear(width, width) for _ in range(num_modalities))
        self.view_score = nn.Linear(width, 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_outputs)

    def fuse(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = torch.stack([project(z[:, m]) for m, project in enumerate(self.project)], dim=1)    # [B, M, d]
        weights = self.weigh(h.mean(dim=1)).softmax(dim=-1)                                     # [B, M]
        queries = torch.stack([query(h[:, list(view)].mean(dim=1))
                               for view, query in zip(self.views, self.queries)], dim=1)         # [B, V, d]
        tokens = [h, self.empty.expand_as(h)]
        if self.context:
            c = torch.zeros_like(z) if context is None else context
            tokens.insert(1, torch.stack([project(c[:, m]) for m, project in enumerate(self.project)], dim=1)
                          + self.context_position)
        tokens = torch.stack(tokens, dim=2)                                                     # [B, M, S, d]
        answers = []
        for m in range(len(self.project)):
            keys, values = self.keys[m](tokens[:, m]), self.values[m](tokens[:, m])             # [B, S, d]
            attention = (queries @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])).softmax(dim=-1)
            answers.append(attention @ values)                                                  # [B, V, d]
        gathered = (torch.stack(answers, dim=2) * weights[:, None, :, None]).sum(dim=2)         # [B, V, d]
        view_weights = self.view_score(gathered).softmax(dim=1)                                 # [B, V, 1]
        return (gathered * view_weights).sum(dim=1)

    def output(self, fused: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(fused))


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
FUSION_HEADS = {"mlp": MlpFusion, "umca": UmcaFusion}


def build_encoder(arch: str, **kwargs) -> nn.Module:
    if arch not in ENCODERS:
        raise KeyError(f"unknown encoder {arch!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[arch](**kwargs)


def build_fusion_head(arch: str, **kwargs) -> FusionHead:
    if arch not in FUSION_HEADS:
        raise KeyError(f"unknown fusion head {arch!r}; known: {', '.join(sorted(FUSION_HEADS))}")
    return FUSION_HEADS[arch](**kwargs)
