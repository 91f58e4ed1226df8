"""The decision path shared by training (model selection), evaluation and the daemon:
encode -> restore -> add session context -> fusion head."""

from __future__ import annotations

import os

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when torch finds a device, else the CPU; `cuda` where there is none is an error naming the fix."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {name!r}: choose auto, cpu or cuda")
    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise ValueError(f"device cuda: torch {torch.__version__} finds no CUDA device here; use auto or cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and available) else "cpu")


def actor_device(num_gpus: float) -> str:
    """Where an actor given `num_gpus` by Ray runs its model: CUDA when it was given a GPU torch can see."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def limit_threads(requested: int | None = None) -> int:
    """Set this process's torch threads: `requested`, else OMP_NUM_THREADS, else one. The models are small: a
    second thread gains little, and threads of two processes that outnumber the cores slow both many times
    over. Returns the number set."""
    threads = requested or int(os.environ.get("OMP_NUM_THREADS") or 1)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


@torch.no_grad()
def embed(encoders: dict[str, torch.nn.Module], features: dict[str, np.ndarray | torch.Tensor],
          modalities: list[str], rows: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 embeddings [B, M, E] and presence [B, M] for the modalities given in `features`, on the
    encoders' device."""
    device = next(next(iter(encoders.values())).parameters()).device
    z = torch.zeros(rows, len(modalities), embed_dim, device=device)
    present = torch.zeros(rows, len(modalities), dtype=torch.bool, device=device)
    for i, modality in enumerate(modalities):
        if modality in features:
            z[:, i] = encoders[modality](torch.as_tensor(features[modality], dtype=torch.float32, device=device))
            present[:, i] = True
    return z, present


def session_context(filled: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of the filled embeddings of each row's previous windows; zeros for a session's first window.

    `previous` [B, K] holds row indices into `filled`, -1 where there is none.
    """
    valid = (previous >= 0).unsqueeze(-1).unsqueeze(-1).to(filled.dtype)  # [B, K, 1, 1]
    gathered = filled[previous.clamp_min(0)] * valid                         # [B, K, M, E]
    return gathered.sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


def head_outputs(head: torch.nn.Module, filled: torch.Tensor, context: torch.Tensor | None,
                 present: torch.Tensor, complete_head: torch.nn.Module | None,
                 aside: torch.Tensor | None = None) -> torch.Tensor:
    """The restorer's head; rows with every modality present, and rows the restorer stepped `aside` on (left
    zero-filled), go to the complete-data head when there is one.

    A head trained on restored inputs is the better judge of restored windows, but the
    head trained on complete data is the better one for windows that need no restoring.
    `present` [B, M] tells a head with a Modality Imagination Autoencoder which embeddings to refine.
    """
    outputs = head(filled, context, present)
    complete = present.all(dim=1) if aside is None else present.all(dim=1) | aside
    if complete_head is not None and complete_head is not head and bool(complete.any()):
        outputs[complete] = complete_head(filled[complete], None if context is None else context[complete])
    return outputs


@torch.no_grad()
def predict(head: torch.nn.Module, restorer, z: torch.Tensor, present: torch.Tensor,
            previous: torch.Tensor | None = None,
            complete_head: torch.nn.Module | None = None):
    """(head outputs, the Restoration) for a batch; `previous` indexes rows of the same batch."""
    restoration = restorer.restore(z, present)
    filled = restoration.filled
    context = session_context(filled, previous) if head.context and previous is not None else None
    return head_outputs(head, filled, context, present, complete_head, restoration.aside), restoration
