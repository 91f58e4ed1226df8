"""Typed frames passed between actors. These types are the interfaces of the pipeline.

Nothing per-frame crosses an actor boundary: a sensor actor sends, per batch
interval, the partial window sums it accumulated and each stream's progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class WindowDelta:
    """Weighted sum of one stream's embeddings that fell into one window since the last batch."""
    session: str
    source: str
    modality: str
    window_id: int
    total: np.ndarray
    weight: float
    frames: int            # data messages that arrived for this window (encoded or not)


@dataclass(slots=True)
class StreamProgress:
    """Where one stream (one source in one session) stands, as seen by its sensor actor."""
    session: str
    source: str
    modality: str
    progress: float        # event time up to which the stream has delivered everything
    arrived_at: float      # wall time of the latest message (data, heartbeat or end)
    offset: float          # estimated (daemon wall clock - sensor clock), lowest recent delay
    ended: bool
    seq_gaps: int          # messages missing according to `seq`, cumulative
    period: float = math.inf  # median interval between recent messages on the sensor's clock (inf until known)
    jitter: float = 0.0       # spread (max - min) of recent delivery delays, seconds


@dataclass(slots=True)
class SensorBatch:
    sensor: str
    deltas: list[WindowDelta]
    progress: list[StreamProgress]


@dataclass(slots=True)
class ClosedWindow:
    """A window the aligner has closed: what was observed, and what the restorer added."""
    session: str
    window_id: int
    start: float
    end: float
    features: dict[str, np.ndarray]
    present: list[str]
    missing: list[str]
    dropped: list[str]
    closed_at: float
    seq: int = 0                        # close order within the session: 0, 1, 2, ... without gaps
    embeddings: np.ndarray | None = None  # [M, E] in the bundle's modality order, once encoded and restored
    restored: list[str] = field(default_factory=list)
    restorer: str = "none"
    extra: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing
