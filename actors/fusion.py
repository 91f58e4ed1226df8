"""Fusion actor: the bundle's fusion head turns windows into decisions, each session's
windows in the order the aligner closed them (complete windows come straight from the
aligner, incomplete ones through the restorer, so they may arrive out of order)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import structlog
import torch

from mmfuse.actors.restorer import WindowEncoder
from mmfuse.bundle import Bundle, load_bundle
from mmfuse.frames import ClosedWindow
from mmfuse.inference import head_outputs
from mmfuse.logs import configure
from mmfuse.wire import Decision


@dataclass
class SessionState:
    next_seq: int = 0
    waiting: dict[int, ClosedWindow] = field(default_factory=dict)
    history: deque = field(default_factory=deque)  # filled embeddings of the previous windows
    seen_at: float = 0.0


class FusionHead:
    """Decisions for batches of closed windows, in per-session order, with session context. No I/O."""

    def __init__(self, bundle: Bundle, restorer: str, session_idle_s: float = 60.0):
        self.bundle = bundle
        self.head = bundle.head(bundle.restorers[restorer]["head"])
        self.complete_head = bundle.complete_head()
        self.encoder = WindowEncoder(bundle)
        self.context = bundle.context
        self.session_idle = session_idle_s
        self.sessions: dict[tuple[int, str], SessionState] = {}  # by (replay, session): a replay starts afresh

    def decide(self, windows: list[ClosedWindow]) -> list[Decision]:
        if not windows:
            return []
        now = max(w.closed_at for w in windows)  # the aligner's clock: wall time live, the recording's in a replay
        self._forget_idle(now)  # first: a session the aligner forgot starts again at seq 0
        ready = []
        for window in windows:
            state = self.sessions.setdefault((window.replay, window.session), SessionState())
            state.seen_at = now
            if window.revision:
                ready.append(window)
                continue
            state.waiting[window.seq] = window
            while state.next_seq in state.waiting:
                ready.append(state.waiting.pop(state.next_seq))
                state.next_seq += 1
        if not ready:
            return []
        raw = [w for w in ready if w.embeddings is None]
        if raw:
            z, _ = self.encoder.encode(raw)
            for window, row in zip(raw, z.numpy()):
                window.embeddings = row
        filled = torch.from_numpy(np.stack([w.embeddings for w in ready]))
        context = torch.from_numpy(np.stack([self._context(w) for w in ready])) if self.context else None
        complete = torch.tensor([w.complete for w in ready])
        with torch.no_grad():
            outputs = head_outputs(self.head, filled, context, complete, self.complete_head).numpy()
        return [self._decision(w, o) for w, o in zip(ready, outputs)]

    def _context(self, window: ClosedWindow) -> np.ndarray:
        """Mean of the session's previous windows' embeddings (zeros for its first), then remember this one
        (a revision replaces nothing: it takes the context of now)."""
        history = self.sessions[(window.replay, window.session)].history
        context = np.mean(history, axis=0) if history else np.zeros_like(window.embeddings)
        if window.revision:
            return context.astype(np.float32)
        history.append(window.embeddings)
        while len(history) > self.context:
            history.popleft()
        return context.astype(np.float32)

    def _decision(self, window: ClosedWindow, output: np.ndarray) -> Decision:
        if self.bundle.manifest["output"] == "regression":
            value = float(output[0])
            label, scores = ("positive" if value >= 0 else "negative"), {"sentiment": round(value, 4)}
        else:
            p = torch.softmax(torch.from_numpy(output), dim=-1).numpy()
            label = self.bundle.labels[int(p.argmax())]
            scores = {name: round(float(v), 6) for name, v in zip(self.bundle.labels, p)}
        if window.extra.get("abstain"):
            label = "abstain"
        return Decision(session=window.session, window_id=window.window_id, start=window.start, end=window.end,
                        task=self.bundle.task, label=label, scores=scores, present=window.present,
                        restored=window.restored, dropped=window.dropped, restorer=window.restorer, latency_ms=0.0,
                        bundle=self.bundle.id, closed_at=window.closed_at, extra=window.extra,
                        revision=window.revision, dispatched_at=window.dispatched_at)

    def _forget_idle(self, now: float) -> None:
        latest = max((replay for replay, _ in self.sessions), default=0)
        idle = [key for key, s in self.sessions.items()
                if not s.waiting and (now - s.seen_at > self.session_idle or key[0] < latest)]
        for key in idle:
            del self.sessions[key]


class FusionActor:
    def __init__(self, bundle_path: str, restorer: str, session_idle_s: float, publisher, log_format: dict):
        from mmfuse.actors import limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="fusion")
        self.head = FusionHead(load_bundle(bundle_path), restorer, session_idle_s)
        self.publisher = publisher
        self.in_flight: list = []
        self.decisions = 0
        self.batches = 0

    def ready(self) -> None:
        return None

    def decide(self, windows: list[ClosedWindow]) -> None:
        import ray

        decisions = self.head.decide(windows)
        self.batches += 1
        if not decisions:
            return
        self.decisions += len(decisions)
        self.in_flight.append(self.publisher.publish.remote(decisions))
        if len(self.in_flight) > 64:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        import ray

        ray.get(self.in_flight)
        self.in_flight = []
        waiting = sum(len(s.waiting) for s in self.head.sessions.values())
        if waiting:
            self.log.error("windows never released", count=waiting)
        return self.stats()

    def stats(self) -> dict:
        return {"decisions": self.decisions, "batches": self.batches}
