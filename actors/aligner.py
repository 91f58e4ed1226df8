"""Aligner actor: groups each session's streams into event-time windows, tracks which
streams are alive, and closes every window exactly once: complete windows go to the
fusion actor, incomplete ones to the restorer."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from mmfuse.frames import ClosedWindow, SensorBatch, StreamProgress
from mmfuse.logs import configure


@dataclass
class OpenWindow:
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    frames: dict[str, int] = field(default_factory=dict)

    def add(self, modality: str, total: np.ndarray, weight: float, frames: int) -> None:
        if modality in self.totals:
            self.totals[modality] = self.totals[modality] + total
            self.weights[modality] += weight
            self.frames[modality] += frames
        else:
            self.totals[modality] = total.astype(np.float32, copy=True)
            self.weights[modality] = weight
            self.frames[modality] = frames


@dataclass
class Session:
    streams: dict[str, StreamProgress] = field(default_factory=dict)
    windows: dict[int, OpenWindow] = field(default_factory=dict)
    next_window: int | None = None
    dropped: set[str] = field(default_factory=set)
    first_seen: float = math.inf
    closed: int = 0

    def reach(self) -> float:
        return max((s.progress for s in self.streams.values()), default=-math.inf)

    def last_arrival(self) -> float:
        return max((s.arrived_at for s in self.streams.values()), default=0.0)


class Aligner:
    """Event-time windowing over all sessions. No I/O, no Ray: `now` is passed in.

    A stream is one source's messages in one session. It is live unless it sent
    `end` or has been silent longer than the drop timeout. Window k of a session
    covers [k*hop, k*hop + length) on the sensors' clock and closes when every live
    stream has passed its end, or when each stream that has not is later than
    end + the stream's clock offset + the drop timeout. A configured sensor not yet
    heard from in a session is waited for until the drop timeout has passed since
    the session's first message; after that it counts as dropped. (A configured
    sensor whose modality arrives from other sources is not waited for.)
    """

    def __init__(self, modalities: list[str], sensors: dict[str, str], length_s: float, hop_s: float,
                 timeout_s: float, session_idle_s: float = 60.0, log=None, period_factor: float = 0.0,
                 flush_s: float = 0.0, min_share: float = 0.0):
        self.modalities = sorted(modalities)
        self.sensors = dict(sorted(sensors.items()))  # configured sensor name -> modality
        self.length, self.hop, self.timeout = length_s, hop_s, timeout_s
        self.period_factor, self.flush, self.min_share = period_factor, flush_s, min_share
        self.session_idle = session_idle_s
        self.sessions: dict[str, Session] = {}
        self.log = log or structlog.get_logger()
        self.counts = {"closed": 0, "complete": 0, "incomplete": 0, "empty": 0, "late": 0}

    def push(self, batch: SensorBatch) -> None:
        for progress in batch.progress:
            session = self.sessions.setdefault(progress.session, Session())
            session.streams[progress.source] = progress
            session.first_seen = min(session.first_seen, progress.arrived_at)
        for delta in batch.deltas:
            session = self.sessions.setdefault(delta.session, Session())
            if session.next_window is None:
                session.next_window = delta.window_id
            if delta.window_id < session.next_window:
                self.counts["late"] += 1
                continue
            session.windows.setdefault(delta.window_id, OpenWindow()).add(delta.modality, delta.total, delta.weight,
                                                                          delta.frames)

    def poll(self, now: float) -> list[ClosedWindow]:
        closed = []
        for name in list(self.sessions):
            session = self.sessions[name]
            self._track_liveness(name, session, now)
            closed.extend(self._close_ready(name, session, now, draining=False))
            if now - session.last_arrival() > self.session_idle and not session.windows:
                self.log.info("session forgotten", session=name, idle_s=round(now - session.last_arrival(), 1))
                del self.sessions[name]
        return closed

    def drain(self, now: float) -> list[ClosedWindow]:
        closed = []
        for name, session in self.sessions.items():
            self._track_liveness(name, session, now)
            closed.extend(self._close_ready(name, session, now, draining=True))
        self.sessions.clear()
        return closed

    def silence_limit(self, stream: StreamProgress) -> float:
        """How long a stream may stay silent: k of its own periods, plus the spread of its delivery
        delays and the sensor actor's flush interval (the most its news can lag), at most the timeout."""
        if self.period_factor and math.isfinite(stream.period):
            return min(self.timeout, self.flush + self.period_factor * stream.period + stream.jitter)
        return self.timeout

    def _live(self, stream: StreamProgress, now: float) -> bool:
        return not stream.ended and now - stream.arrived_at <= self.silence_limit(stream)

    def _too_sparse(self, session: Session, modality: str, frames: int, end: float) -> bool:
        """Fewer frames than min_share of what the periods of the modality's streams that delivered the
        window promise for it (a stream that dropped or ended before the window's end promises nothing)."""
        if not self.min_share:
            return False
        rates = [1 / s.period for s in session.streams.values()
                 if s.modality == modality and math.isfinite(s.period) and s.progress >= end]
        expected = self.length * sum(rates)
        return expected > 0 and frames < self.min_share * expected

    def _track_liveness(self, name: str, session: Session, now: float) -> None:
        for source, stream in session.streams.items():
            live = self._live(stream, now)
            if not live and source not in session.dropped:
                session.dropped.add(source)
                if stream.ended:
                    self.log.info("stream ended", session=name, source=source)
                else:
                    self.log.info("stream dropped", session=name, source=source,
                                  silent_s=round(now - stream.arrived_at, 3))
            elif live and source in session.dropped:
                session.dropped.discard(source)
                self.log.info("stream back", session=name, source=source)

    def _unheard(self, session: Session) -> list[str]:
        """Configured sensors with no stream in this session, and none of their modality either."""
        heard = {s.modality for s in session.streams.values()}
        return [name for name, modality in self.sensors.items()
                if name not in session.streams and modality not in heard]

    def _closable(self, session: Session, end: float, now: float) -> bool:
        if now < session.first_seen + self.timeout and self._unheard(session):
            return False
        for stream in session.streams.values():
            if stream.progress >= end or not self._live(stream, now):
                continue
            if now < end + stream.offset + self.timeout:
                return False
        return True

    def _close_ready(self, name: str, session: Session, now: float, draining: bool) -> list[ClosedWindow]:
        closed = []
        if session.next_window is None:
            return closed
        reach = session.reach()
        last_open = max(session.windows, default=-1)
        while True:
            k = session.next_window
            start = k * self.hop
            end = start + self.length
            if draining:
                if k > last_open:
                    break
            elif start >= reach or not self._closable(session, end, now):
                break
            window = session.windows.pop(k, None)
            session.next_window = k + 1
            observed = [m for m in window.totals if window.weights[m] > 0] if window is not None else []
            if not observed:
                self.counts["empty"] += 1
                continue
            reliable = [m for m in observed if not self._too_sparse(session, m, window.frames[m], end)] or observed
            features = {m: (window.totals[m] / window.weights[m]).astype(np.float32) for m in reliable}
            present = sorted(features)
            missing = [m for m in self.modalities if m not in features]
            dropped = sorted({source for source, s in session.streams.items() if s.progress < end}
                             | set(self._unheard(session)))
            closed.append(ClosedWindow(name, k, start, end, features, present, missing, dropped, now, session.closed))
            session.closed += 1
            self.counts["closed"] += 1
            self.counts["incomplete" if missing else "complete"] += 1
        return closed

    def stats(self) -> dict:
        return {**self.counts, "sessions": len(self.sessions),
                "open_windows": sum(len(s.windows) for s in self.sessions.values())}


class AlignerActor:
    """Wraps Aligner: sensor batches arrive as calls; a ticker closes windows on deadlines."""

    TICK_S = 0.01

    def __init__(self, modalities: list[str], sensors: dict[str, str], window: dict, drop: dict, pipeline: dict,
                 restorer, fusion, log_format: dict):
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="aligner")
        self.aligner = Aligner(modalities, sensors, window["length_s"], window["hop_s"], drop["timeout_s"],
                               pipeline["session_idle_s"], self.log, drop["period_factor"],
                               pipeline["flush_interval_ms"] / 1000, drop["min_share"])
        self.restorer, self.fusion = restorer, fusion
        self.lock = threading.Lock()
        self.in_flight: list = []
        self.calls = 0
        self.stopping = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="aligner-ticker", daemon=True)
        self.ticker.start()

    def ready(self) -> None:
        return None

    def push(self, batch: SensorBatch) -> None:
        with self.lock:
            self.aligner.push(batch)
            self._dispatch(self.aligner.poll(time.time()))

    def _tick(self) -> None:
        while not self.stopping.wait(self.TICK_S):
            with self.lock:
                self._dispatch(self.aligner.poll(time.time()))

    def _dispatch(self, windows: list[ClosedWindow]) -> None:
        import ray

        complete = [w for w in windows if w.complete]
        incomplete = [w for w in windows if not w.complete]
        if complete:
            self.in_flight.append(self.fusion.decide.remote(complete))
            self.calls += 1
        if incomplete:
            self.in_flight.append(self.restorer.restore.remote(incomplete))
            self.calls += 1
        if len(self.in_flight) > 64:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        import ray

        self.stopping.set()
        self.ticker.join()
        with self.lock:
            self._dispatch(self.aligner.drain(time.time()))
            ray.get(self.in_flight)
            self.in_flight = []
        return self.stats()

    def stats(self) -> dict:
        return {**self.aligner.stats(), "calls_out": self.calls}
