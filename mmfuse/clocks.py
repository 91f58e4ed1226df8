"""One source's clock against the daemon's, learned from arrival times alone.

A message sent at sensor time t arrives at daemon time t + offset + delay, where the
delay is never negative. So the lowest delays seen trace the offset (as NTP and LSL
do): per second of the source's time the tracker keeps the lowest (arrival - t), and
fits a line through those minima with the Theil-Sen estimator, which a few stalled
seconds cannot tilt; its slope is the drift.

A clock reset or jump shows as time running backwards (the sensor clock leapt back),
as a message that arrives before it could have been sent while the source's time
leapt ahead of the daemon's between two messages (it leapt forward), or as a source
that restarts (its `seq` begins again) on another clock. The tracker then shifts the
source's later times by the jump, so that the stream's timeline stays continuous, as
if the clock had never been reset. (A clock that leaps back while its source is
silent, without a restart, cannot be told from a slow network: its data comes late.)
The reset's size is refined over the next REFINE_S of arrivals, since its first
message may have been held up; messages held up together with it are placed where
they arrived rather than where they were sent.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

MIN_BUCKETS = 4  # buckets (seconds) of a source's time before its clock line is fitted
LEARNING_S = MIN_BUCKETS * 1.0  # how long a source's clock takes to learn, with the default bucket


@dataclass(frozen=True, slots=True)
class ClockLine:
    """A source's clock against the daemon's: daemon time = t + intercept + drift * t, for stream time t."""
    intercept: float
    drift: float


@dataclass(frozen=True, slots=True)
class ClockJump:
    jump_s: float   # how far the sensor clock leapt (positive: forward)


class ClockTracker:
    REFINE_S = 2.0  # after a reset, arrivals over which its size is refined

    def __init__(self, jump_s: float = 1.0, bucket_s: float = 1.0, buckets: int = 64, settle: int = 8):
        self.jump_s, self.bucket_s, self.settle = jump_s, bucket_s, settle
        self.refine_until = -math.inf  # a reset is sized by its first message, which may have been held up
        self.added_since_reset = 0
        self.minima: deque[tuple[int, float, float]] = deque(maxlen=buckets)  # (bucket, t, lowest delay) per bucket
        self.correction = 0.0   # added to the source's times across resets
        self.resets = 0
        self.seen = 0           # messages since the last reset
        self.last_t = -math.inf
        self.last_arrived = -math.inf
        self._line: ClockLine | None = None
        self._floor = math.nan
        self._stale = False     # minima changed since the line was fitted: fit it when next asked for

    @property
    def line(self) -> ClockLine | None:
        """The fitted clock line, once MIN_BUCKETS seconds have been seen."""
        if self._stale:
            self._refit()
        return self._line

    @property
    def floor(self) -> float:
        """The lowest delay, while there is no line."""
        if self._stale:
            self._refit()
        return self._floor

    def offset(self, t: float) -> float:
        """Daemon time minus the (continuous) source time, at source time t."""
        return self.floor if self.line is None else self.line.intercept + self.line.drift * t

    @property
    def drift(self) -> float:
        return 0.0 if self.line is None else self.line.drift

    def estimate(self) -> dict:
        """What the tracker knows now, for logs and recordings."""
        return {"offset_s": self.offset(self.last_t), "drift_ppm": self.drift * 1e6, "resets": self.resets,
                "correction_s": self.correction}

    def observe(self, t: float, arrived: float, restarted: bool = False) -> ClockJump | None:
        """A message delivered up to source time t arrived at daemon time `arrived` (`restarted`: its source
        began its seq again); returns the jump it revealed, if any. Map the source's times with
        `+ self.correction` after this call."""
        jump = self._jump(t + self.correction, arrived, restarted)
        if jump is not None:
            self.correction -= jump
            self.resets += 1
            self.seen = 0
            self.refine_until, self.added_since_reset = arrived + self.REFINE_S, 0
        elif arrived < self.refine_until:
            self._refine(t, arrived)
        u = t + self.correction
        self.last_t, self.last_arrived = u, arrived
        self.seen += 1
        self._add(u, arrived - u)
        return None if jump is None else ClockJump(jump)

    def jump_of(self, t: float, arrived: float) -> float | None:
        """The jump that `observe(t, arrived)` would reveal, without changing anything."""
        return self._jump(t + self.correction, arrived, False)

    def _refine(self, t: float, arrived: float) -> None:
        """A message after a reset that arrived sooner than the line allows: the reset was sized on a delayed
        message. Size it on this one, and forget what was learned since with the wrong size."""
        u = t + self.correction
        early = self.offset(u) - (arrived - u)
        if early > 0:
            self.correction -= early
            for _ in range(min(self.added_since_reset, len(self.minima) - 1)):
                self.minima.pop()
            self.added_since_reset = 0
            self._refit()

    def _jump(self, u: float, arrived: float, restarted: bool) -> float | None:
        if not self.minima:
            return None
        leapt = (u - self.last_t) - (arrived - self.last_arrived) > self.jump_s
        back = u < self.last_t - self.jump_s
        if not (back or restarted or (leapt and self.seen >= self.settle)):
            return None  # the common case, decided without the line
        delay = arrived - u
        expected = self.offset(u)
        if back:
            return expected - delay
        if restarted and abs(delay - expected) > self.jump_s:
            return expected - delay
        if self.seen >= self.settle and leapt and delay < expected - self.jump_s:
            return expected - delay
        return None

    def _add(self, u: float, delay: float) -> None:
        bucket = math.floor(u / self.bucket_s)
        if self.minima and bucket <= self.minima[-1][0]:  # the same second, or a small step back
            if delay < self.minima[-1][2]:
                self.minima[-1] = (self.minima[-1][0], u, delay)
                self._stale = True
            return
        self.minima.append((bucket, u, delay))
        self.added_since_reset += 1
        self._stale = True

    def _refit(self) -> None:
        self._stale = False
        x = np.array([t for _, t, _ in self.minima])
        y = np.array([d for _, _, d in self.minima])
        if len(x) < MIN_BUCKETS:
            self._line, self._floor = None, float(y.min())
            return
        i, j = _pairs(len(x))
        drift = max(float(np.median((y[j] - y[i]) / (x[j] - x[i]))), -0.99)
        self._line = ClockLine(float(np.min(y - drift * x)), drift)


@functools.cache
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j), i < j, of every pair of n points: a quarter of a refit's time when made afresh."""
    return np.triu_indices(n, k=1)
