"""Restorer actor: fills the missing modality embeddings of incomplete windows, a batch
at a time, then hands the batch to the fusion actor."""

from __future__ import annotations

import numpy as np
import structlog

from mmfuse.bundle import load_bundle
from mmfuse.frames import ClosedWindow
from mmfuse.logs import configure
from mmfuse.restorers import create_restorer


def restore_windows(restorer, dims: dict[str, int], windows: list[ClosedWindow]) -> list[ClosedWindow]:
    """Fill every window's missing modalities in one batched restorer call."""
    features = {m: np.zeros((len(windows), dim), np.float32) for m, dim in dims.items()}
    present = {m: np.zeros(len(windows), bool) for m in dims}
    for i, window in enumerate(windows):
        for m, vector in window.features.items():
            features[m][i] = vector
            present[m][i] = True
    filled = restorer.restore(features, present)
    for i, window in enumerate(windows):
        window.restored = [m for m in window.missing if m in dims]
        window.features = {**window.features, **{m: filled[m][i] for m in window.restored}}
        window.restorer = restorer.name
    return windows


class RestorerActor:
    def __init__(self, bundle_path: str, method: str, fusion, log_format: dict):
        from mmfuse.actors import limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="restorer")
        bundle = load_bundle(bundle_path)
        self.restorer = create_restorer(method, bundle)
        self.dims = {m: spec["dim"] for m, spec in bundle.modalities.items()}
        self.fusion = fusion
        self.in_flight: list = []
        self.windows = 0
        self.batches = 0
        self.log.info("restorer ready", method=method, bundle=bundle.id)

    def ready(self) -> None:
        return None

    def restore(self, windows: list[ClosedWindow]) -> None:
        import ray

        windows = restore_windows(self.restorer, self.dims, windows)
        self.windows += len(windows)
        self.batches += 1
        self.in_flight.append(self.fusion.decide.remote(windows))
        if len(self.in_flight) > 64:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        import ray

        ray.get(self.in_flight)
        self.in_flight = []
        return self.stats()

    def stats(self) -> dict:
        return {"windows": self.windows, "batches": self.batches, "method": self.restorer.name}
