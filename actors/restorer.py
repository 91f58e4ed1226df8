"""Restorer actor: encodes incomplete windows, fills their missing modality embeddings
with the configured restorer, a batch at a time, and hands the batch to fusion."""

from __future__ import annotations

import structlog
import torch

from mmfuse.bundle import Bundle, load_bundle
from mmfuse.frames import ClosedWindow
from mmfuse.inference import embed
from mmfuse.logs import configure


class WindowEncoder:
    """The bundle's frozen stage-1 encoders over a batch of windows. No I/O."""

    def __init__(self, bundle: Bundle):
        self.encoders = bundle.encoders()
        self.order = bundle.modality_order
        self.embed_dim = bundle.manifest["embed_dim"]

    def encode(self, windows: list[ClosedWindow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, M, E] and presence [B, M]; modalities absent from a window stay zero."""
        z = torch.zeros(len(windows), len(self.order), self.embed_dim)
        present = torch.zeros(len(windows), len(self.order), dtype=torch.bool)
        for i, modality in enumerate(self.order):
            rows = [b for b, w in enumerate(windows) if modality in w.features]
            if rows:
                features = {modality: torch.stack([torch.from_numpy(windows[b].features[modality]) for b in rows])}
                z[rows, i] = embed(self.encoders, features, [modality], len(rows), self.embed_dim)[0][:, 0]
                present[rows, i] = True
        return z, present


class WindowRestorer:
    """Encode + restore a batch of incomplete windows. No I/O."""

    def __init__(self, bundle: Bundle, method: str):
        self.encoder = WindowEncoder(bundle)
        self.restorer = bundle.restorer(method)
        self.method = method

    def restore(self, windows: list[ClosedWindow]) -> list[ClosedWindow]:
        z, present = self.encoder.encode(windows)
        with torch.no_grad():
            filled = self.restorer.restore(z, present).numpy()
        for i, window in enumerate(windows):
            window.embeddings = filled[i]
            window.restored = [m for m in window.missing if m in self.encoder.order]
            window.restorer = self.method
        return windows


class RestorerActor:
    def __init__(self, bundle_path: str, method: str, fusion, log_format: dict):
        from mmfuse.actors import limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="restorer")
        bundle = load_bundle(bundle_path)
        self.restorer = WindowRestorer(bundle, method)
        self.fusion = fusion
        self.in_flight: list = []
        self.windows = 0
        self.batches = 0
        self.log.info("restorer ready", method=method, bundle=bundle.id,
                      device="cuda" if torch.cuda.is_available() else "cpu")

    def ready(self) -> None:
        return None

    def restore(self, windows: list[ClosedWindow]) -> None:
        import ray

        windows = self.restorer.restore(windows)
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
        return {"windows": self.windows, "batches": self.batches, "method": self.restorer.method}
