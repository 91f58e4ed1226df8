"""Fusion actor: the bundle's fusion head turns a batch of windows into decisions."""

from __future__ import annotations

import numpy as np
import structlog
import torch

from mmfuse.bundle import Bundle, load_bundle
from mmfuse.frames import ClosedWindow
from mmfuse.logs import configure
from mmfuse.wire import Decision


class FusionHead:
    """The bundle's head over batches of closed windows (every modality filled). No I/O."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.model = bundle.fusion_head()
        self.dims = {m: spec["dim"] for m, spec in bundle.modalities.items()}

    @torch.no_grad()
    def decide(self, windows: list[ClosedWindow]) -> list[Decision]:
        inputs = {m: torch.from_numpy(np.stack([w.features[m] for w in windows])) for m in self.dims}
        probabilities = torch.softmax(self.model(inputs), dim=-1).numpy()
        labels = self.bundle.labels
        decisions = []
        for window, p in zip(windows, probabilities):
            decisions.append(Decision(
                session=window.session, window_id=window.window_id, start=window.start, end=window.end,
                task=self.bundle.task, label=labels[int(p.argmax())],
                scores={label: round(float(v), 6) for label, v in zip(labels, p)},
                present=window.present, restored=window.restored, dropped=window.dropped,
                restorer=window.restorer, latency_ms=0.0, bundle=self.bundle.id,
                closed_at=window.closed_at, extra=window.extra))
        return decisions


class FusionActor:
    def __init__(self, bundle_path: str, publisher, log_format: dict):
        from mmfuse.actors import limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="fusion")
        self.head = FusionHead(load_bundle(bundle_path))
        self.publisher = publisher
        self.in_flight: list = []
        self.decisions = 0
        self.batches = 0

    def ready(self) -> None:
        return None

    def decide(self, windows: list[ClosedWindow]) -> None:
        import ray

        decisions = self.head.decide(windows)
        self.decisions += len(decisions)
        self.batches += 1
        self.in_flight.append(self.publisher.publish.remote(decisions))
        if len(self.in_flight) > 64:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        import ray

        ray.get(self.in_flight)
        self.in_flight = []
        return self.stats()

    def stats(self) -> dict:
        return {"decisions": self.decisions, "batches": self.batches}
