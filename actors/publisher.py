"""Publisher actor: binds the output PUB socket and publishes decisions on `decision/<session>`."""

from __future__ import annotations

import dataclasses
import time

import structlog
import zmq

from mmfuse import wire
from mmfuse.logs import configure


class PublisherActor:
    def __init__(self, endpoint: str, log_format: dict):
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="publisher")
        self.endpoint = endpoint
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.error: str | None = None
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.error = f"output: cannot bind {endpoint}: {exc}"
        self.published = 0

    def ready(self) -> str | None:
        return self.error

    def publish(self, decisions: list[wire.Decision]) -> None:
        now = time.time()
        for decision in decisions:
            decision = dataclasses.replace(decision, latency_ms=round((now - decision.dispatched_at) * 1000, 3))
            self.socket.send_multipart(wire.encode_decision(decision))
            self.log.debug("decision", session=decision.session, window=decision.window_id,
                           label=decision.label, restored=decision.restored, dropped=decision.dropped)
        self.published += len(decisions)

    def drain(self) -> dict:
        self.socket.close()  # LINGER lets queued decisions go out first
        return self.stats()

    def stats(self) -> dict:
        return {"published": self.published}
