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
from mmfuse.frames import ClosedWindow, SessionEnd
from mmfuse.inference import head_outputs
from mmfuse.logs import configure
from mmfuse.wire import Decision


CONTEXTS_KEPT = 256  # contexts remembered per session, for revisions of its recent windows


@dataclass
class SessionState:
    next_seq: int = 0
    waiting: dict[int, ClosedWindow] = field(default_factory=dict)
    revisions: list[ClosedWindow] = field(default_factory=list)  # of windows not released yet
    history: deque = field(default_factory=deque)  # filled embeddings of the previous windows
    contexts: dict[int, np.ndarray] = field(default_factory=dict)  # seq -> the context its decision used
    published: dict[int, int] = field(default_factory=dict)  # seq -> latest revision published
    end: SessionEnd | None = None  # the aligner forgot the session: how many windows and revisions it closed
    revised: int = 0

    def done(self) -> bool:
        return (self.end is not None and self.next_seq >= self.end.windows and self.revised >= self.end.revisions
                and not self.waiting)


class FusionHead:
    """Decisions for batches of closed windows, in per-session order, with session context. No I/O.

    A session's state lives until the aligner says it has forgotten the session (SessionEnd) and every
    window it closed has been decided."""

    def __init__(self, bundle: Bundle, restorer: str):
        self.bundle = bundle
        self.head = bundle.head(bundle.restorers[restorer]["head"])
        self.complete_head = bundle.complete_head()
        self.encoder = WindowEncoder(bundle)
        self.context = bundle.context
        self.sessions: dict[tuple[str, int], SessionState] = {}  # by (session, the aligner's epoch of it)

    def decide(self, windows: list[ClosedWindow]) -> list[Decision]:
        ready, touched = [], set()
        for window in windows:
            key = (window.session, window.epoch)
            state = self.sessions.setdefault(key, SessionState())
            touched.add(key)
            if window.revision:
                state.revisions.append(window)
            else:
                state.waiting[window.seq] = window
            while state.next_seq in state.waiting:
                ready.append(state.waiting.pop(state.next_seq))
                state.next_seq += 1
            released = [w for w in state.revisions if w.seq < state.next_seq]  # after their first decision
            state.revisions = [w for w in state.revisions if w.seq >= state.next_seq]
            state.revised += len(released)
            for revision in sorted(released, key=lambda w: (w.seq, w.revision)):
                if revision.revision > state.published.get(revision.seq, 0):  # a later one may have overtaken it
                    state.published[revision.seq] = revision.revision
                    ready.append(revision)
        decisions = self._decide(ready) if ready else []
        for key in touched:
            if self.sessions[key].done():
                del self.sessions[key]
        return decisions

    def finish(self, ends: list[SessionEnd]) -> None:
        """The aligner forgot these sessions; their state goes once their last windows are decided."""
        for end in ends:
            key = (end.session, end.epoch)
            state = self.sessions.setdefault(key, SessionState())
            state.end = end
            if state.done():
                del self.sessions[key]

    def _decide(self, ready: list[ClosedWindow]) -> list[Decision]:
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
        """Mean of the session's previous windows' embeddings (zeros for its first), then remember this one.
        A revision takes the context its window's first decision took."""
        state = self.sessions[(window.session, window.epoch)]
        if window.revision and window.seq in state.contexts:
            return state.contexts[window.seq]
        history = state.history
        context = (np.mean(history, axis=0) if history else np.zeros_like(window.embeddings)).astype(np.float32)
        if window.revision:
            return context
        history.append(window.embeddings)
        while len(history) > self.context:
            history.popleft()
        state.contexts[window.seq] = context
        state.contexts.pop(window.seq - CONTEXTS_KEPT, None)
        return context

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


class FusionActor:
    def __init__(self, bundle_path: str, restorer: str, publisher, log_format: dict):
        from mmfuse.actors import limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="fusion")
        self.head = FusionHead(load_bundle(bundle_path), restorer)
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

    def finish(self, ends: list[SessionEnd]) -> None:
        self.head.finish(ends)

    def drain(self) -> dict:
        import ray

        ray.get(self.in_flight)
        self.in_flight = []
        waiting = sum(len(s.waiting) for s in self.head.sessions.values())
        if waiting:
            self.log.error("windows never released", count=waiting)
        return self.stats()

    def stats(self) -> dict:
        return {"decisions": self.decisions, "batches": self.batches, "sessions": len(self.head.sessions)}
