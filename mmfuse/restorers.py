"""Restorers fill the embeddings of missing modalities from the ones present.

Each restorer works on a batch: `features` maps modality -> float32 array [B, dim]
(rows of missing modalities hold anything), `present` maps modality -> bool array [B].
It returns new arrays; rows of present modalities are returned unchanged.
"""

from __future__ import annotations

import numpy as np


class ZeroRestorer:
    """Missing embeddings become zero vectors: what a pipeline without a restorer does."""
    name = "zero"

    def __init__(self, bundle):
        self.dims = {m: spec["dim"] for m, spec in bundle.modalities.items()}

    def restore(self, features: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {m: np.where(present[m][:, None], x, 0.0).astype(np.float32) for m, x in features.items()}


class MeanRestorer:
    """Missing embeddings become the training-set mean of that modality (from the bundle)."""
    name = "mean"

    def __init__(self, bundle):
        stats = bundle.tensors("stats")
        self.means = {m: stats[f"{m}.mean"].numpy() for m in bundle.modalities}

    def restore(self, features: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {m: np.where(present[m][:, None], x, self.means[m]).astype(np.float32) for m, x in features.items()}


RESTORERS = {
    "zero": ZeroRestorer,
    "mean": MeanRestorer,
}


def create_restorer(name: str, bundle):
    if name not in RESTORERS:
        raise KeyError(f"unknown restorer {name!r}; choose one of {', '.join(sorted(RESTORERS))}")
    return RESTORERS[name](bundle)
