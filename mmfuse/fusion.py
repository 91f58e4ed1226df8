"""The fusion stage's core: the bundle's fusion head turns closed windows into decisions,
each session's windows in the order the aligner closed them, with session context. No I/O."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from mmfuse.bundle import Bundle
from mmfuse.calibration import row_temperatures, softmax
from mmfuse.frames import ClosedWindow, SessionEnd
from mmfuse.inference import head_outputs
from mmfuse.restoration import WindowEncoder, WindowRestorer
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
    window it closed has been decided. Windows come restored, or not: those without embeddings are encoded
    here, and incomplete ones restored by `stand_in` when given (this stage stands in for the restorer while
    it is down), else left at zero where missing. A copy of a window decided already (handed on again after
    a restart, or by a stage that stood in) is decided again with the context it had: the publisher drops it
    if the first went out, and acknowledges it either way. `resume` says from where in each session's close
    order a restarted fusion stage carries on. Scores are calibrated for the window's presence pattern
    (mmfuse.calibration); with `abstain_below`, a window whose top score is below it is labelled `abstain`."""

    def __init__(self, bundle: Bundle, restorer: str, stand_in: WindowRestorer | None = None,
                 abstain_below: float | None = None, device: str = "cpu"):
        self.bundle = bundle
        self.device = device
        self.head = bundle.head(bundle.restorers[restorer]["head"]).to(device)
        self.temperatures = bundle.restorers[restorer].get("temperatures", {})
        self.spread_gain = bundle.restorers[restorer].get("spread_gain", 0.0)
        self.abstain_below = abstain_below
        self.complete_head = bundle.complete_head()
        if self.complete_head is not None:
            self.complete_head.to(device)
        self.encoder = WindowEncoder(bundle)
        self.stand_in = stand_in
        self.context = bundle.context
        self.sessions: dict[tuple[str, int], SessionState] = {}  # by (session, the aligner's epoch of it)
        self.redecided = 0

    def warm_up(self, rows: int = 64) -> None:
        """Decide `rows` stand-in windows of a session no sensor can name, and forget it: torch's first calls
        cost the first batch of a run several times what the next ones cost."""
        zeros = {m: np.zeros(spec["dim"], np.float32) for m, spec in self.bundle.modalities.items()}
        self.decide([ClosedWindow("", i, 0.0, 0.0, zeros, list(zeros), [], [], 0.0, seq=i, epoch=-1)
                     for i in range(rows)])
        del self.sessions[("", -1)]

    def decide(self, windows: list[ClosedWindow]) -> list[Decision]:
        ready, again, touched = [], [], set()
        for window in windows:
            key = (window.session, window.epoch)
            state = self.sessions.setdefault(key, SessionState())
            touched.add(key)
            decided = window.seq < state.next_seq and (
                not window.revision or window.revision <= state.published.get(window.seq, 0))
            if decided:
                if window.revision >= state.published.get(window.seq, 0):  # not overtaken by a later revision
                    again.append(window)
            elif window.revision:
                state.revisions.append(window)
            else:
                state.waiting[window.seq] = window
            self._release(state, ready)
        decisions = self._decide(ready, again) if ready or again else []
        self._forget_done(touched)
        return decisions

    def resume(self, floors: dict[tuple[str, int], int]) -> list[Decision]:
        """Carry on each session's close order from its floor: windows before it were decided and published."""
        ready = []
        for key, floor in floors.items():
            state = self.sessions.setdefault(key, SessionState())
            if floor > state.next_seq:
                state.next_seq = floor
                state.waiting = {seq: w for seq, w in state.waiting.items() if seq >= floor}
            self._release(state, ready)
        decisions = self._decide(ready, []) if ready else []
        self._forget_done(floors)
        return decisions

    @staticmethod
    def _release(state: SessionState, ready: list[ClosedWindow]) -> None:
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

    def _forget_done(self, keys) -> None:
        for key in keys:
            state = self.sessions.get(key)
            if state is not None and state.done():
                del self.sessions[key]

    def finish(self, ends: list[SessionEnd]) -> None:
        """The aligner forgot these sessions; their state goes once their last windows are decided."""
        for end in ends:
            key = (end.session, end.epoch)
            state = self.sessions.setdefault(key, SessionState())
            state.end = end
            if state.done():
                del self.sessions[key]

    def _decide(self, ready: list[ClosedWindow], again: list[ClosedWindow]) -> list[Decision]:
        windows = ready + again
        unrestored = [w for w in windows if w.embeddings is None and not w.complete]
        if unrestored and self.stand_in is not None:
            self.stand_in.restore(unrestored)
        raw = [w for w in windows if w.embeddings is None]
        if raw:
            z, _ = self.encoder.encode(raw)
            for window, row in zip(raw, z.numpy()):
                window.embeddings = row
        filled = torch.from_numpy(np.stack([w.embeddings for w in windows]))
        context = None
        if self.context:
            contexts = [self._context(w) for w in ready] + [self._context_of(w) for w in again]
            context = torch.from_numpy(np.stack(contexts))
        # A window with nothing missing counts as complete even where the bundle knows a modality no sensor sends
        present = torch.tensor([[w.complete or m in w.present for m in self.bundle.modality_order] for w in windows])
        with torch.no_grad():
            aside = torch.tensor([w.stepped_aside or w.restoration_failed for w in windows])  # zero-filled ones
            outputs = head_outputs(self.head, filled.to(self.device), None if context is None else
                                   context.to(self.device), present.to(self.device), self.complete_head,
                                   aside.to(self.device)).cpu().numpy()
        self.redecided += len(again)
        return [self._decision(w, o) for w, o in zip(windows, outputs)]

    def _context_of(self, window: ClosedWindow) -> np.ndarray:
        """The context a window decided before had (zeros if it is no longer remembered)."""
        state = self.sessions[(window.session, window.epoch)]
        return state.contexts.get(window.seq, np.zeros_like(window.embeddings))

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
        abstain = window.abstain
        if self.bundle.manifest["output"] == "regression":
            value = float(output[0])
            label, scores = ("positive" if value >= 0 else "negative"), {"sentiment": round(value, 4)}
        else:
            present = [m in window.present for m in self.bundle.modality_order]
            p = softmax(output[None], row_temperatures(
                np.array([present]), self.bundle.modality_order, self.temperatures,
                None if window.spread is None else np.array([window.spread]), self.spread_gain))[0]
            label = self.bundle.labels[int(p.argmax())]
            scores = {name: round(float(v), 6) for name, v in zip(self.bundle.labels, p)}
            abstain = abstain or (self.abstain_below is not None and p.max() < self.abstain_below)
        if abstain:
            label = "abstain"
        return Decision(session=window.session, window_id=window.window_id, start=window.start, end=window.end,
                        task=self.bundle.task, label=label, scores=scores, present=window.present,
                        restored=window.restored, dropped=window.dropped, restorer=window.restorer, latency_ms=0.0,
                        bundle=self.bundle.id, closed_at=window.closed_at, spread=window.spread,
                        abstain=abstain, restoration_failed=window.restoration_failed,
                        revision=window.revision, dispatched_at=window.dispatched_at, key=window.key,
                        seq_gaps=window.seq_gaps, late=window.late)
