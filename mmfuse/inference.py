"""The decision path shared by training (model selection), evaluation and the daemon:
encode -> restore -> add session context -> fusion head."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def embed(encoders: dict[str, torch.nn.Module], features: dict[str, np.ndarray | torch.Tensor],
          modalities: list[str], rows: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 embeddings [B, M, E] and presence [B, M] for the modalities given in `features`."""
    z = torch.zeros(rows, len(modalities), embed_dim)
    present = torch.zeros(rows, len(modalities), dtype=torch.bool)
    for i, modality in enumerate(modalities):
        if modality in features:
            z[:, i] = encoders[modality](torch.as_tensor(features[modality], dtype=torch.float32))
            present[:, i] = True
    return z, present


def session_context(filled: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of the filled embeddings of each row's previous windows; zeros for a session's first window.

    `previous` [B, K] holds row indices into `filled`, -1 where there is none.
    """
    valid = (previous >= 0).unsqueeze(-1).unsqueeze(-1).to(filled.dtype)  # [B, K, 1, 1]
    gathered = filled[previous.clamp_min(0)] * valid                         # [B, K, M, E]
    return gathered.sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


@torch.no_grad()
def predict(head: torch.nn.Module, restorer, z: torch.Tensor, present: torch.Tensor,
            previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head outputs, filled embeddings) for a batch; `previous` indexes rows of the same batch."""
    filled = restorer.restore(z, present)
    context = session_context(filled, previous) if head.context and previous is not None else None
    return head(filled, context), filled
