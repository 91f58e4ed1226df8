"""Double-flow self-distillation (arXiv 2410.15029) of a fusion head trained on restored embeddings.

Each batch runs a full flow (every modality present) and a missing flow (a random incomplete pattern, the
missing embeddings filled by the bundle's restorer and refined by the head's Modality Imagination
Autoencoder) through the same head. Loss: the task loss on both flows (0.5 / 0.5); MKD, the RMSE between the
missing flow's refined embeddings of the missing modalities and the full flow's (the full side carries no
gradient); RS, the RMSE between the two flows' fused vectors; RNC, Rank-N-Contrast (Zha et al. 2023) over both
flows' fused vectors through a 2-layer projection to 64-d. For classification RNC's label distance is 0 for the
same class and 1 for another (classes have no order): same-class windows are pulled together, the others apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mmfuse.models import FusionHead
from mmfuse.options import DISTILL_DEFAULTS

PROJECTION_DIM = 64


@dataclass(frozen=True)
class DistillWeights:
    mkd: float = DISTILL_DEFAULTS["mkd"]
    rs: float = DISTILL_DEFAULTS["rs"]
    rnc: float = DISTILL_DEFAULTS["rnc"]
    temperature: float = DISTILL_DEFAULTS["temperature"]


def rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().mean().clamp_min(1e-12).sqrt()


def rank_n_contrast(features: torch.Tensor, labels: torch.Tensor, temperature: float,
                    categorical: bool = False) -> torch.Tensor:
    """L_RNC: for each anchor i and other sample j, -log of exp(s_ij) over the sum of exp(s_ik) for every k != i
    at least as far from i in label as j is; s = -||v_i - v_j||_2 / temperature. The label distance is
    |y_i - y_j|, or for `categorical` labels 0 for the same class and 1 for another (classes have no order).

    Each anchor's others are sorted by label distance, farthest first, so every pair's denominator is one entry
    of a cumulative log-sum-exp: O(N^2 log N), not the N^3 of comparing every pair with every other sample.
    """
    n = len(features)
    others = ~torch.eye(n, dtype=torch.bool, device=features.device)
    squared = features.square().sum(dim=1)
    distance = (squared[:, None] + squared[None] - 2 * features @ features.T).clamp_min(1e-12).sqrt()
    similarity = -distance / temperature                                               # [N, N]
    gap = (labels[:, None] != labels[None]) if categorical else (labels[:, None] - labels[None]).abs()
    label_distance = gap.float().masked_fill(~others, -1.0)  # self sorts last
    order = label_distance.argsort(dim=1, descending=True)
    cumulative = torch.logcumsumexp(similarity.masked_fill(~others, float("-inf")).gather(1, order), dim=1)
    ascending = -label_distance.gather(1, order)           # ascending negated distances, for searchsorted
    at_least_as_far = torch.searchsorted(ascending.contiguous(), (-label_distance).contiguous(), right=True)
    denominator = cumulative.gather(1, at_least_as_far - 1)                              # [N, N]
    return -(similarity - denominator)[others].mean()


class SelfDistillation(nn.Module):
    """The double-flow loss of one head; owns the RNC projection, which is used in training only."""

    def __init__(self, head: FusionHead, task_loss: Callable, weights: DistillWeights, categorical: bool):
        super().__init__()
        self.categorical = categorical  # classification: RNC's label distance is same class or not
        if head.imagination is None:
            raise ValueError("self-distillation needs a head built with imagination=True")
        self.head, self.task_loss, self.weights = head, task_loss, weights
        width = head.fused_dim
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, PROJECTION_DIM))

    def forward(self, z_full: torch.Tensor, restored: torch.Tensor, present: torch.Tensor,
                context_full: torch.Tensor | None, context_missing: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        head, w = self.head, self.weights
        fused_full = head.fuse(z_full, context_full)
        refined = head.refine(restored, present)
        fused_missing = head.fuse(refined, context_missing)
        loss = 0.5 * self.task_loss(head.output(fused_full), targets) + \
            0.5 * self.task_loss(head.output(fused_missing), targets)
        missing = ~present
        if w.mkd and bool(missing.any()):
            loss = loss + w.mkd * rmse(refined[missing], z_full[missing].detach())
        if w.rs:
            loss = loss + w.rs * rmse(fused_missing, fused_full)
        if w.rnc:
            labels = targets.reshape(len(targets), -1)[:, 0].repeat(2)
            loss = loss + w.rnc * rank_n_contrast(self.projection(torch.cat([fused_full, fused_missing])),
                                                  labels, w.temperature, categorical=self.categorical)
        return loss
