"""Typed frames passed between actors. These types are the interfaces of the pipeline.

Nothing per-frame crosses an actor boundary: a sensor actor sends, per batch
interval, the partial window sums it accumulated and each stream's progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mmfuse.clocks import ClockLine


WindowKey = tuple[str, int, int, int]
"""A closed window's identity across restarts: session, epoch, seq (close order), revision."""


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
    run: int = 0           # the stream's run (wire key `run`): a new run is a new life of the session
    gaps: int = 0          # messages missing by seq in a stretch of the stream overlapping this window


@dataclass(slots=True)
class StreamProgress:
    """Where one stream (one source in one session) stands, as seen by its sensor actor.

    Stream time is the source's clock, continued across its resets; the aligner maps it
    onto the session's timeline with `offset`."""
    session: str
    source: str
    modality: str
    progress: float        # stream time up to which the stream has delivered everything
    arrived_at: float      # wall time of the latest message (data, heartbeat or end)
    offset: float          # daemon wall clock - stream time now, from the lowest delays (mmfuse.clocks)
    ended: bool
    seq_gaps: int          # messages missing according to `seq`, cumulative
    period: float = math.inf  # median interval between recent messages on the stream's clock (inf until known)
    jitter: float = 0.0       # spread (max - min) of recent delivery delays, seconds
    drift: float = 0.0        # how fast the offset changes, s/s
    resets: int = 0           # clock resets and jumps found; stream time stays continuous across them
    line: ClockLine | None = None  # the stream's clock against the daemon's, once enough of it has been seen
    run: int = 0              # the stream's run (wire key `run`)


@dataclass(slots=True)
class Span:
    """The stream-time span of one text segment: with utterance windows, one window."""
    session: str
    source: str
    start: float
    end: float
    run: int = 0


@dataclass(slots=True)
class SensorBatch:
    sensor: str
    deltas: list[WindowDelta]
    progress: list[StreamProgress]
    spans: list[Span] = field(default_factory=list)
    incarnation: str = ""   # which life of the sensor actor made it (a restarted one counts from 0 again)
    number: int = 0         # 0, 1, 2, ... per incarnation: the aligner applies each batch once
    as_of: float = math.nan  # wall time a live sensor's account of its streams is as of: all that arrived
                             # before it had been read (its socket was found empty then)
    taken_at: float = math.nan  # wall time a live sensor took the batch: it was alive then


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The aligner forgot a session: it closed this many windows and revisions in that life of it."""
    session: str
    epoch: int
    windows: int
    revisions: int


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
    revision: int = 0                   # > 0: closed again after late data (same window, no new seq)
    epoch: int = 0                      # which life of the session in the aligner (it forgets idle sessions)
    dispatched_at: float = 0.0          # wall time the aligner actor handed it on (closed_at is the aligner's
                                        # clock: the recording's on a virtual clock)
    embeddings: np.ndarray | None = None  # [M, E] in the bundle's modality order, once encoded and restored
    restored: list[str] = field(default_factory=list)
    restorer: str = "none"
    spread: float | None = None         # diffusion with K samples: their mean standard deviation
    abstain: bool = False               # the spread is above restorer.abstain_spread
    restoration_failed: bool = False    # restoring raised: the missing modalities were left at zero
    stepped_aside: bool = False         # the restorer steps aside for this pattern: zero-filled, complete head
    seq_gaps: dict[str, int] = field(default_factory=dict)  # modality -> messages its streams lost around it
    late: dict[str, int] = field(default_factory=dict)      # a revision: modality -> late messages it took in

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def key(self) -> WindowKey:
        return self.session, self.epoch, self.seq, self.revision
