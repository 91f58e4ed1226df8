"""Fusion actor: the bundle's fusion head turns windows into decisions, each session's
windows in the order the aligner closed them, and hands them to the publisher. While the
restorer is down it restores incomplete windows itself."""

from __future__ import annotations

import structlog

from mmfuse.config import DaemonConfig
from mmfuse.frames import ClosedWindow, SessionEnd
from mmfuse.incarnation import Incarnation
from mmfuse.logs import configure
from mmfuse.pipeline import build_fusion, build_restorer
from mmfuse.stages import StageHandles

IN_FLIGHT_KEPT = 64


class FusionActor:
    def __init__(self, config: DaemonConfig, log_format: dict):
        from mmfuse.bundle import load_bundle
        from mmfuse.inference import actor_device, limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="fusion")
        self.incarnation = Incarnation.here()
        bundle = load_bundle(config.bundle)
        device = actor_device(config.fusion.num_gpus)
        self.head = build_fusion(config, bundle, build_restorer(config, bundle, device), device)
        self.head.warm_up()
        self.stages = StageHandles()
        self.in_flight: list = []
        self.decisions = self.batches = self.failed = 0
        self.log.info("fusion ready", bundle=bundle.id, device=device, incarnation=self.incarnation.token)

    def ping(self) -> Incarnation:
        return self.incarnation

    def connect(self) -> None:
        """Connect to the publisher before the first decision goes to it (mmfuse.stages)."""
        self.in_flight += self.stages.connect(["publisher"])

    def decide(self, windows: list[ClosedWindow]) -> None:
        self.batches += 1
        try:
            self._publish(self.head.decide(windows))
        except Exception as exc:  # the windows stay unacknowledged in the aligner's outbox
            self.failed += len(windows)
            self.log.exception("deciding failed; the windows stay unpublished", windows=len(windows),
                               error=repr(exc))

    def resume(self, floors: dict[tuple[str, int], int]) -> None:
        self._publish(self.head.resume(floors))

    def finish(self, ends: list[SessionEnd]) -> None:
        self.head.finish(ends)

    def _publish(self, decisions) -> None:
        import ray

        if not decisions:
            return
        self.decisions += len(decisions)
        self.in_flight.append(self.stages["publisher"].publish.remote(decisions))
        if len(self.in_flight) > IN_FLIGHT_KEPT:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        waiting = sum(len(s.waiting) for s in self.head.sessions.values())
        if waiting:
            self.log.error("windows never released", count=waiting)
        return self.stats()

    def stats(self) -> dict:
        return {"decisions": self.decisions, "batches": self.batches, "sessions": len(self.head.sessions),
                "decided_again": self.head.redecided, "failed": self.failed}
