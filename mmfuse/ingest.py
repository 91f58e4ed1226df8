"""The sensor stage's core: decoded messages of one sensor in, window sums and stream
progress out (SensorBatch), media encoded by the bundle's tower in one batch per push.
No I/O: the sensor actor (mmfuse.actors.sensor) owns the socket."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import structlog

from mmfuse import wire
from mmfuse.clocks import ClockTracker
from mmfuse.frames import SensorBatch, Span, StreamProgress, WindowDelta
from mmfuse.logs import Tally
from mmfuse.media import MediaEncoder, MediaError

DELAY_MEMORY = 64  # arrivals over which the delay jitter is taken
PERIOD_MEMORY = 32  # message intervals over which a stream's period is learned
SLIVER_S = 1e-9     # overlaps shorter than this are rounding error (0.1 * 300 != 30.0), not data
SEQ_JUMP = 100      # a seq further ahead than this breaks with its stream: 3 s of a 30 fps camera lost at once
GAP_WINDOWS = 100   # a seq gap is reported in at most this many windows before the message that revealed it
MAX_FEATURE = 1e6   # |feature value| above this is no feature (CMU-MOSI's reach 373) but overflow in the making
SAFE_SQUARES = 0.99 * MAX_FEATURE ** 2  # a sum of squares below this (NaN is not) leaves every value finite and
                                      # within MAX_FEATURE, with room for rounding of the sum
CHECKED_TOGETHER = 4  # features messages checked in one pass (check_values), at least: fewer cost more that way
_REJECTED = np.empty((0, 0), np.float32)  # the vectors of a message check_values refused


@dataclass(slots=True)
class Checked:
    """A message that passed every check, with what it contributes; not yet applied to its stream."""
    message: wire.SensorMessage
    arrived_at: float
    vectors: np.ndarray | None = None  # features
    item: object = None                # raw media, prepared by the MediaEncoder
    frames: tuple[bytes, bytes] = ()   # topic and payload as received


@dataclass
class StreamState:
    session: str
    source: str
    modality: str
    last_seq: int = -1
    last_end: float = -math.inf  # where the latest message ended, on the stream's continuous timeline
    progress: float = -math.inf
    arrived_at: float = 0.0
    ended: bool = False
    seq_gaps: int = 0
    clock: ClockTracker = field(default_factory=ClockTracker)
    delays: deque = field(default_factory=lambda: deque(maxlen=DELAY_MEMORY))
    last_t: float = math.nan
    intervals: deque = field(default_factory=lambda: deque(maxlen=PERIOD_MEMORY))
    held: Checked | None = None  # a message that breaks with the stream, until the next one confirms it
    run: int = 0                 # a new run (a replay again) is a new life of the stream: nothing carries over

    def sent_at(self, t: float) -> None:
        """Learn the period from origin times: the sensor's clock carries no network jitter."""
        if t > self.last_t:
            self.intervals.append(t - self.last_t)
        self.last_t = t

    @property
    def period(self) -> float:
        """Median interval between recent messages; unknown (inf) until a few have been seen."""
        return statistics.median(self.intervals) if len(self.intervals) >= 4 else math.inf  # (numpy's: 10x slower)

    def snapshot(self, until: float = math.inf) -> StreamProgress:
        """Its account as of now; the progress no further than `until` (where media not yet encoded begins)."""
        return StreamProgress(self.session, self.source, self.modality, min(self.progress, until), self.arrived_at,
                              self.clock.offset(self.clock.last_t), self.ended, self.seq_gaps, self.period,
                              max(self.delays) - min(self.delays), self.clock.drift, self.clock.resets,
                              self.clock.line, self.run)

    def restart(self) -> None:
        """The source restarted (its seq began again at 0): forget what its clock and periods taught."""
        self.last_seq, self.last_t = -1, math.nan
        self.intervals.clear()


def windows_overlapping(start: float, end: float, length: float, hop: float) -> range:
    """Ids k of windows [k*hop, k*hop+length) that overlap [start, end] (a point when start == end)."""
    if end - start > SLIVER_S:
        start, end = start + SLIVER_S, end - SLIVER_S
    first = math.floor((start - length) / hop) + 1
    last = math.floor(end / hop) if end > start else math.floor(start / hop)
    if end > start and last * hop >= end:
        last -= 1
    return range(first, last + 1)


class SensorIngest:
    """Turns decoded messages of one sensor into window sums and stream progress. No I/O."""

    def __init__(self, sensor: str, modality: str, length_s: float, hop_s: float, dim: int | None,
                 max_payload: int = wire.DEFAULT_MAX_PAYLOAD, log=None, media: MediaEncoder | None = None,
                 clock_jump_s: float = 1.0, spans: bool = False, idle_s: float = 60.0, max_span_s: float = 60.0,
                 sender_key: str | None = None, other_sensors: frozenset[str] = frozenset(),
                 keep_accepted: bool = False):
        self.sensor, self.modality, self.dim = sensor, modality, dim
        self.keep_accepted = keep_accepted  # for mmfuse-record: see take_accepted()
        self.accepted_frames: list[tuple[bytes, bytes, float]] = []
        self.sender_key = sender_key        # authenticated sensors: the only key this sensor's messages come from
        self.other_sensors = other_sensors  # names this sensor must not send as
        self.idle_s, self.max_span = idle_s, max_span_s
        self.clock_jump_s = clock_jump_s
        self.keep_spans = spans and modality == "text"  # utterance windows: text segments are the windows
        self.spans: list[Span] = []
        self.media = media
        self.length, self.hop = length_s, hop_s
        self.max_payload = max_payload
        self.log = log or structlog.get_logger().bind(sensor=sensor)
        self.streams: dict[tuple[str, str], StreamState] = {}
        self.touched: dict[tuple[str, str], None] = {}  # ordered: batches must not depend on hashing
        self.deltas: dict[tuple[str, str, int], WindowDelta] = {}
        self.arrivals: dict[tuple[str, str, int], int] = {}  # data messages per window since the last batch
        self.rejected = Tally()
        self.unsupported = Tally()
        self.accepted = 0
        self.due = False  # a window may close once the aligner hears what we hold: send soon
        self.due_since = -math.inf  # arrival of the message that passed the window end the batch is due for

    def _window_ends_before(self, t: float) -> float:
        """How many window ends lie at or before event time t (a step function of t)."""
        return math.floor((t - self.length) / self.hop) if math.isfinite(t) else -math.inf

    def ingest(self, frames: list[bytes], arrived_at: float, sender: str | None = None) -> None:
        """One message as received (`sender`: the CURVE key it came from, when sensors authenticate)."""
        self.take(self.check_values([self.check(frames, arrived_at, sender)])[0])

    def take(self, frame: Checked | None) -> None:
        """A message that passed `check` and `check_values` (None: one that did not). It changes its stream only
        if it does not break with it (see `_discontinuity`), or when the stream's next message confirms it."""
        if frame is None:
            return
        message = frame.message
        key = (message.session, message.source)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = StreamState(message.session, message.source, message.modality,
                                                     clock=ClockTracker(self.clock_jump_s), run=message.run)
            self.log.info("stream started", session=message.session, source=message.source, run=message.run)
            self._apply(stream, frame)
            return
        new = message.seq > stream.last_seq or (message.seq == 0 and stream.last_seq > 0)
        breaks = self._discontinuity(stream, frame) if new else "duplicate"
        held, stream.held = stream.held, None
        if held is not None:
            new_run = held.message.run != stream.run
            if breaks and self._continues(held, frame, 0.0 if new_run else stream.clock.correction):
                if new_run:
                    stream = self._begin_run(key, held)
                self._apply(stream, held)  # the stream really went where the held message said
                self._apply(stream, frame)
                return
            if not new:
                stream.held = held  # a stray duplicate says nothing about the held message
            else:
                self.reject("outlier", f"{held.message.session}/{held.message.source} seq {held.message.seq} "
                            f"t {held.message.t:g}: the stream's next message did not follow it")
        if not new:
            self.reject("duplicate_or_reordered", f"seq {message.seq} after {stream.last_seq} "
                        f"({message.session}/{message.source})")
        elif breaks:
            stream.held = frame
            self.log.debug("message held until the next confirms it", session=message.session,
                           source=message.source, seq=message.seq, reason=breaks)
        else:
            self._apply(stream, frame)

    def check(self, frames: list[bytes], arrived_at: float, sender: str | None) -> Checked | None:
        """The message with everything it will contribute, or None (counted and logged) if a check fails; the
        values of features wait for `check_values`. Touches no stream."""
        if self.sender_key is not None and sender != self.sender_key:
            self.reject("wrong_source", f"a message from key {sender} on sensor {self.sensor}, whose key is "
                        f"{self.sender_key}")
            return None
        try:
            message = wire.decode(frames, self.max_payload)
        except wire.WireError as exc:
            self.reject(exc.reason, exc.detail)
            return None
        if message.source in self.other_sensors:
            self.reject("wrong_source", f"{message.session}/{message.source} sent on sensor {self.sensor}")
            return None
        if message.modality != self.modality:
            self.reject("modality", f"{message.modality} message on {self.modality} sensor {self.sensor}")
            return None
        frame = Checked(message, arrived_at, frames=(frames[0], frames[1]))
        if message.kind != "data":
            return frame
        if message.duration > self.max_span:
            self.reject("too_long", f"{message.session}/{message.source} seq {message.seq} spans {message.duration:g} s; "
                        f"at most {self.max_span:g} s (seconds, not milliseconds?)")
            return None
        if message.encoding == "features":
            if self.dim is not None and message.shape[-1] != self.dim:
                self.reject("dim", f"{self.modality} features have {message.shape[-1]} dims, bundle expects {self.dim}")
                return None
        elif self.media is not None and self.media.accepts(message.encoding):
            stream = self.streams.get((message.session, message.source))
            correction = 0.0 if stream is None else stream.clock.correction
            try:
                frame.item = self.media.prepare(dataclasses.replace(message, t=message.t + correction))
            except MediaError as exc:
                self.reject(exc.reason, exc.detail)
                return None
        return frame

    def check_values(self, frames: list[Checked | None]) -> list[Checked | None]:
        """`frames` with the vectors of every features message set, and None for those whose values are not all
        finite and within MAX_FEATURE (counted and logged). The little float32 messages of this sensor's width
        are checked together, in one pass over their concatenated values: a check per message costs more in numpy
        calls than in arithmetic."""
        features = [f for f in frames
                    if f is not None and f.message.encoding == "features" and f.message.kind == "data"]
        for frame in features:
            if frame.vectors is not _REJECTED:  # (checked again if a first check failed part way: not refused twice)
                frame.vectors = None
        common = [f for f in features if f.message.dtype == "<f4"]
        if len(common) < CHECKED_TOGETHER or len({f.message.shape[-1] for f in common}) > 1:
            common = []  # (without a bundle widths may differ) one check each
        if common:
            dim = common[0].message.shape[-1]
            rows = np.frombuffer(b"".join(f.message.data for f in common), np.float32).reshape(-1, dim)
            wide = rows.astype(np.float64)  # float32 squares of huge values would overflow
            squares = np.einsum("ij,ij->i", wide, wide)
            counts = [len(f.message.data) // (4 * dim) for f in common]
            ends = np.cumsum(counts)
            sums = np.add.reduceat(squares, ends - counts).tolist()
            start = 0
            for frame, count, total in zip(common, counts, sums):
                frame.vectors = rows[start:start + count]
                start += count
                if not total <= SAFE_SQUARES:  # one sum clears nearly every message: see SAFE_SQUARES
                    self._check_each_value(frame)
        for frame in features:
            if frame.vectors is None:
                flat = np.frombuffer(frame.message.data, frame.message.dtype)
                with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, rejected as non_finite
                    frame.vectors = flat.astype(np.float32, copy=False).reshape(-1, frame.message.shape[-1])
                wide = frame.vectors.astype(np.float64)
                if not float(np.einsum("ij,ij->", wide, wide)) <= SAFE_SQUARES:
                    self._check_each_value(frame)
        return [None if f is None or f.vectors is _REJECTED else f for f in frames]

    def _check_each_value(self, frame: Checked) -> None:
        message = frame.message
        if not np.isfinite(frame.vectors).all():
            self.reject("non_finite", f"{message.session}/{message.source} seq {message.seq}")
            frame.vectors = _REJECTED
        elif np.abs(frame.vectors).max() > MAX_FEATURE:
            self.reject("out_of_range", f"{message.session}/{message.source} seq {message.seq}: a value "
                        f"beyond ±{MAX_FEATURE:g}, which window sums and the models would turn into inf or NaN")
            frame.vectors = _REJECTED

    def _discontinuity(self, stream: StreamState, frame: Checked) -> str | None:
        """How a new message breaks with its stream, if it does: its seq begins again or leaps ahead, or its time
        leaps (a clock reset, as the stream's clock tracker would take it). One such message from a faulty or
        hostile sender must not move the stream, so it waits for the stream's next message (`_continues`)."""
        message = frame.message
        if message.run != stream.run:
            return "new_run"
        if message.seq == 0 and stream.last_seq > 0:
            return "restart"
        clock = stream.clock
        leap = self._leap(stream.last_seq, clock.last_t, clock.last_arrived, frame, clock.correction)
        if leap is None and clock.jump_of(message.t + message.duration, frame.arrived_at) is not None:
            return "clock_jump"
        return leap

    def _leap(self, seq: int, end: float, arrived: float, frame: Checked, correction: float) -> str | None:
        """Whether a message leaps from one that ended at stream time `end` (its seq `seq`, arrived `arrived`)."""
        message = frame.message
        if message.seq - seq > SEQ_JUMP:
            return "seq_jump"
        start = message.t + correction
        if start + message.duration < end - self.clock_jump_s:  # (a span may begin long ago: a text segment)
            return "time_back"
        if (start - end) - (frame.arrived_at - arrived) > self.clock_jump_s:  # a gap of more stream than wall time
            return "time_ahead"
        return None

    def _continues(self, held: Checked, frame: Checked, correction: float) -> bool:
        """Whether a message follows on from a held one, as a stream that went where the held one said would."""
        before = held.message
        return frame.message.run == before.run and frame.message.seq > before.seq and self._leap(before.seq, before.t + before.duration + correction,
                                                             held.arrived_at, frame, correction) is None

    def _begin_run(self, key: tuple[str, str], frame: Checked) -> StreamState:
        """The stream's source began a new run (a replay of the session again): a fresh stream, its own clock."""
        old = self.streams[key]
        self.log.info("stream began a new run", session=key[0], source=key[1], run=frame.message.run,
                      after_run=old.run)
        if self.media is not None:
            self.media.forget(key)
        stream = self.streams[key] = StreamState(old.session, old.source, old.modality,
                                                 clock=ClockTracker(self.clock_jump_s), run=frame.message.run)
        return stream

    def _apply(self, stream: StreamState, frame: Checked) -> None:
        message, arrived_at = frame.message, frame.arrived_at
        key = (message.session, message.source)
        restarted = message.seq == 0 and stream.last_seq > 0
        if restarted:
            self.log.info("stream restarted", session=message.session, source=message.source,
                          after_seq=stream.last_seq)
            stream.restart()
        message = self._on_stream_time(stream, message, arrived_at, restarted)
        if frame.vectors is not None:
            windows = self._count_arrival(message)
            if len(frame.vectors) == 1:
                self._add_span(message.session, message.source, stream.run, message.t, message.t + message.duration,
                               frame.vectors[0], windows)
            else:
                step = message.duration / len(frame.vectors)
                for i, vector in enumerate(frame.vectors):
                    self._add_span(message.session, message.source, stream.run, message.t + i * step,
                                   message.t + (i + 1) * step, vector)
        elif frame.item is not None:
            self.media.add(message, frame.item)
            self._count_arrival(message)
        elif message.kind == "data" and self.unsupported.add(message.encoding):
            self.log.warning("frames this sensor cannot encode", encoding=message.encoding,
                             count=self.unsupported.counts[message.encoding],
                             hint="send 'features', or use a bundle trained on this modality's raw media"
                             if self.media is None else f"a {self.modality} sensor takes "
                             f"{', '.join(e for e in wire.ENCODINGS if self.media.accepts(e))} or features")

        if self.keep_spans and message.kind == "data" and message.duration > 0:
            self.spans.append(Span(message.session, message.source, message.t, message.t + message.duration,
                                   stream.run))
        if stream.last_seq >= 0 and message.seq > stream.last_seq + 1:
            missing = message.seq - stream.last_seq - 1
            stream.seq_gaps += missing
            self._count_gap(message, stream, missing)
        stream.last_seq = message.seq
        delivered = message.t + message.duration
        stream.last_end = delivered
        reached = delivered
        if self.media is not None:
            if message.kind == "end":
                self.media.end(key)
            elif message.kind == "heartbeat":
                self.media.heartbeat(key, message.t)
            reached = self.media.complete_until(key, delivered)
        if message.kind == "end" or self._window_ends_before(reached) > self._window_ends_before(stream.progress):
            if not self.due or self.due_since == -math.inf:
                self.due_since = arrived_at
            self.due = True
        stream.progress = max(stream.progress, reached)
        stream.arrived_at = arrived_at
        stream.sent_at(message.t)
        stream.delays.append(arrived_at - delivered)  # not the held-back `reached`: that is no network delay
        if message.kind == "end":
            stream.ended = True
            self.log.info("stream ended", session=message.session, source=message.source,
                          **self._clock_fields(stream))
        elif stream.ended:
            stream.ended = False
            self.log.info("stream resumed after end", session=message.session, source=message.source)
        self.touched[key] = None
        self.accepted += 1
        if self.keep_accepted:
            self.accepted_frames.append((*frame.frames, arrived_at))

    def _on_stream_time(self, stream: StreamState, message: wire.SensorMessage, arrived_at: float,
                        restarted: bool) -> wire.SensorMessage:
        """Feed the stream's clock tracker; the message with its time on the stream's continuous timeline."""
        jump = stream.clock.observe(message.t + message.duration, arrived_at, restarted)
        if jump is not None:
            self.log.warning("clock reset", session=message.session, source=message.source,
                             jump_s=round(jump.jump_s, 3), **self._clock_fields(stream))
        elif stream.clock.seen == stream.clock.settle and not stream.clock.resets:
            self.log.info("clock learned", session=message.session, source=message.source,
                          **self._clock_fields(stream))
        if stream.clock.correction:
            message = dataclasses.replace(message, t=message.t + stream.clock.correction)
        return message

    @staticmethod
    def _clock_fields(stream: StreamState) -> dict:
        return {key: round(value, 4) for key, value in stream.clock.estimate().items()}

    def _count_arrival(self, message: wire.SensorMessage) -> range:
        """Count a data message for every window it overlaps; those windows."""
        windows = windows_overlapping(message.t, message.t + message.duration, self.length, self.hop)
        for k in windows:
            key = (message.session, message.source, message.run, k)
            self.arrivals[key] = self.arrivals.get(key, 0) + 1
        return windows

    def _count_gap(self, message: wire.SensorMessage, stream: StreamState, missing: int) -> None:
        """Mark the windows between the stream's previous message and this one as missing `missing` messages
        (each of them: the seq does not say where in the stretch they were), so their decisions say so."""
        if self.dim is None:
            return
        start = stream.last_end if math.isfinite(stream.last_end) else message.t
        windows = windows_overlapping(min(start, message.t), message.t, self.length, self.hop)
        for k in windows[-GAP_WINDOWS:]:
            key = (message.session, message.source, stream.run, k)
            delta = self.deltas.get(key)
            if delta is None:
                delta = self.deltas[key] = WindowDelta(message.session, message.source, self.modality, k,
                                                       np.zeros(self.dim, np.float32), 0.0, 0, stream.run)
            delta.gaps += missing

    def _add_span(self, session: str, source: str, run: int, start: float, end: float, vector: np.ndarray,
                  windows: range | None = None) -> None:
        """Add a vector covering [start, end] to every window it overlaps (`windows`, when known), weighted by
        the overlap."""
        for k in windows_overlapping(start, end, self.length, self.hop) if windows is None else windows:
            if end > start:
                w_start = k * self.hop
                weight = (min(end, w_start + self.length) - max(start, w_start)) / (end - start)
            else:
                weight = 1.0
            key = (session, source, run, k)
            delta = self.deltas.get(key)
            if delta is None:
                self.deltas[key] = WindowDelta(session, source, self.modality, k, vector * weight, weight, 0, run)
            else:
                delta.total += vector if weight == 1.0 else vector * weight
                delta.weight += weight

    def reject(self, reason: str, detail: str) -> None:
        if self.rejected.add(reason):
            self.log.warning("malformed message rejected", reason=reason, detail=detail,
                             count=self.rejected.counts[reason])

    def forget_idle(self, now: float) -> None:
        """Forget streams silent for idle_s (as the aligner forgets sessions), so a daemon that runs for weeks
        keeps no state for sessions long gone; a stream heard again starts afresh."""
        for key in [k for k, s in self.streams.items() if now - s.arrived_at > self.idle_s and k not in self.touched]:
            if self.streams.pop(key).held is not None:
                self.reject("outlier", f"{key[0]}/{key[1]}: a held message no later one confirmed")
            if self.media is not None:
                self.media.forget(key)
            self.log.debug("stream forgotten", session=key[0], source=key[1])

    def push_due(self, waited: float, batch_interval: float, flush_interval: float, now: float | None = None,
                 gather: float = 0.0) -> bool:
        """Whether to hand the aligner a batch, `waited` seconds after the last one: as soon as a
        stream has passed a window end (at most one per batch interval), else after the flush interval.

        With `now` (wall time), a batch due at a window end waits up to `gather` seconds after the message that
        made it due while another stream heard in the last two hops has not reached its own next window end and
        its clock expects it to within `gather` of that message: sessions whose windows end together send their
        last messages as one burst, read in parts. Sent at the first part, the rest would wait for that part's
        encode, then be encoded in a batch of its own. Streams whose windows end at other moments, or that are
        overdue by half a hop (silent, or on a clock it has not learnt), are not waited for."""
        if waited >= flush_interval:
            return True
        if not self.due or waited < batch_interval:
            return False
        return (now is None or now >= self.due_since + gather
                or not self._ends_expected(now - 2 * self.hop, self.due_since - self.hop / 2, self.due_since + gather))

    def _ends_expected(self, heard_since: float, earliest: float, latest: float) -> bool:
        """Whether a stream heard since then has its next window end still to come, due by its clock (the
        lowest delay it has shown) between those wall times."""
        for stream in self.streams.values():
            if stream.ended or stream.arrived_at < heard_since:
                continue
            end = (self._window_ends_before(stream.progress) + 1) * self.hop + self.length
            if earliest <= end + stream.clock.offset(end) <= latest:
                return True
        return False

    def take_accepted(self) -> list[tuple[bytes, bytes, float]]:
        """With `keep_accepted`: every message applied since the last call, as (topic, payload, arrival time), in
        the order applied; a held message comes when the next one confirms it, and a rejected one never."""
        taken, self.accepted_frames = self.accepted_frames, []
        return taken

    def take_batch(self, as_of: float | None = None, defer_media: bool = False) -> SensorBatch | None:
        """What happened since the last batch; None if nothing did, unless `as_of` is given (a live sensor's wall
        time now): then a batch, empty if need be, its account of its streams as of then.

        With `defer_media`, a batch sent because a stream passed a window end encodes only the media of windows
        that may close now; the rest (the camera frame that begins the next window) waits for a batch that is
        not (at the latest the flush interval's), and its stream's progress is reported only up to where that
        media begins. So a window's close does not share the CPU with encoding the next window, and nothing
        can close without its media. And it encodes at most one batch of the tower's (`Tower.live_batch`),
        the next batch due as soon as it may go: a sensor actor encoding 64 camera frames at once was not heard
        from for up to a second, long enough for every one of its streams to look dropped."""
        held_back: dict[tuple[str, str], float] = {}
        if self.media is not None:
            failed = self.media.failed
            spans = self.media.encode(self._after_closable_windows if defer_media and self.due else None,
                                      self.media.live_batch if defer_media else None)
            held_back = self.media.queued_from()
            if self.media.failed > failed:
                self.log.warning("media that could not be decoded or encoded", count=self.media.failed - failed,
                                 total=self.media.failed)
            for span in spans:
                stream = self.streams.get((span.session, span.source))
                self._add_span(span.session, span.source, 0 if stream is None else stream.run, span.start, span.end,
                               span.vector.astype(np.float32))
        for key, count in self.arrivals.items():
            delta = self.deltas.get(key)
            if delta is None and self.dim is not None:  # frames that arrived but were not (yet) encoded
                delta = self.deltas[key] = WindowDelta(key[0], key[1], self.modality, key[3],
                                                       np.zeros(self.dim, np.float32), 0.0, 0, key[2])
            if delta is not None:
                delta.frames = count
        self.arrivals = {}
        if not self.touched and not self.deltas and as_of is None:
            return None
        batch = SensorBatch(self.sensor, list(self.deltas.values()),
                            [self.streams[key].snapshot(held_back.get(key, math.inf)) for key in self.touched],
                            self.spans, as_of=math.nan if as_of is None else as_of)
        self.deltas, self.spans = {}, []
        self.touched = {key: None for key in held_back if key in self.streams}  # their progress, once encoded
        self.due = self.media is not None and self.media.overflow > 0  # the rest as soon as the next batch may go
        self.due_since = -math.inf
        return batch

    def _after_closable_windows(self, session: str, source: str, start: float) -> bool:
        """Whether media starting at `start` lies past the last window end its stream has reached, so that no
        window it belongs to can close before the stream's next batch (an ended stream holds no window back:
        its media goes now)."""
        stream = self.streams.get((session, source))
        if stream is None or stream.ended:
            return False
        reached = self._window_ends_before(stream.progress)
        return math.isfinite(reached) and start >= reached * self.hop + self.length

    def stats(self) -> dict:
        media = {} if self.media is None else {"encoded": self.media.encoded, "encode_failed": self.media.failed,
                                               "frames_skipped": self.media.skipped_frames}
        return {"sensor": self.sensor, "accepted": self.accepted, "rejected": dict(self.rejected.counts), **media,
                "unsupported": dict(self.unsupported.counts), "streams": len(self.streams),
                "seq_gaps": sum(s.seq_gaps for s in self.streams.values()),
                "clock_resets": sum(s.clock.resets for s in self.streams.values())}
