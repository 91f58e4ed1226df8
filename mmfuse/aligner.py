"""The aligner stage's core: groups each session's streams into event-time windows, tracks
which streams are alive, and closes every window exactly once. No I/O, no Ray: `now` is
passed in (mmfuse.actors.aligner wraps it)."""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass, field, replace

import numpy as np
import structlog

from mmfuse.clocks import LEARNING_S
from mmfuse.frames import ClosedWindow, SensorBatch, SessionEnd, Span, StreamProgress, WindowDelta
from mmfuse.logs import worth_a_line


SLIVER_WEIGHT = 0.1  # of one message's span
LATER_KEPT = 1000  # batches of a session's next run kept until its own streams begin it
REAL_TIME_DRIFT = 1e-3  # crystal clocks drift by tens of ppm; a stream seeming to drift more is not sent live


@dataclass
class OpenWindow:
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    frames: dict[str, float] = field(default_factory=dict)  # fractional where a clock shift split a stream window
    gaps: dict[str, int] = field(default_factory=dict)      # messages lost by seq around the window, per modality

    def add(self, modality: str, total: np.ndarray, weight: float, frames: float, gaps: int = 0) -> None:
        if gaps:
            self.gaps[modality] = self.gaps.get(modality, 0) + gaps
        if modality in self.totals:
            self.totals[modality] = self.totals[modality] + total
            self.weights[modality] += weight
            self.frames[modality] += frames
        else:
            self.totals[modality] = total.astype(np.float32, copy=True)
            self.weights[modality] = weight
            self.frames[modality] = frames

    def copy(self) -> OpenWindow:
        """Its sums are replaced as data comes, never changed in place: the copy shares them."""
        return OpenWindow(dict(self.totals), dict(self.weights), dict(self.frames), dict(self.gaps))


@dataclass
class KeptWindow:
    """A closed window kept open for late data (allowed lateness)."""
    window: OpenWindow
    seq: int  # of its first closing
    revision: int = 0
    late: dict[str, int] = field(default_factory=dict)  # late messages per modality since it was last closed

    def copy(self) -> KeptWindow:
        return KeptWindow(self.window.copy(), self.seq, self.revision, dict(self.late))


@dataclass
class Session:
    epoch: int  # unique to this life of the session: a session forgotten and heard again starts a new one
    streams: dict[str, StreamProgress] = field(default_factory=dict)
    windows: dict[int, OpenWindow] = field(default_factory=dict)
    kept: dict[int, KeptWindow] = field(default_factory=dict)
    next_window: int | None = None
    dropped: set[str] = field(default_factory=set)
    first_seen: float = math.inf
    closed: int = 0
    revised: int = 0
    reference: str | None = None    # the source whose clock is session time: the first heard
    reference_learning: float = math.inf  # since when its sensor actor has been learning its clock (again)
    reference_life: str = ""  # the incarnation of the sensor actor that reports it
    first_offset: float | None = None  # its lowest delay, to tell other clocks before they are known
    shifts: dict[str, float] = field(default_factory=dict)  # session time - stream time, per source
    reporters: dict[str, str] = field(default_factory=dict)  # the sensor actor that reports each source
    unmapped: dict[str, list[WindowDelta]] = field(default_factory=dict)  # on another clock, not known yet: held
    utterances: list[tuple[float, float]] = field(default_factory=list)  # utterance windows: spans not closed yet
    held_spans: dict[str, list[Span]] = field(default_factory=dict)  # of text streams on a clock not known yet
    decided_until: float | None = None  # utterance windows: where windows closed so far end, at the latest
    tiled_until: float = -math.inf  # utterance windows: where the time tiles end
    next_id: int = 0
    run: int = 0  # of its streams (wire key `run`): a later run is a new life, an earlier one is stale
    wake_at: float = -math.inf  # wall time from which a poll may find it changed with nothing new (see poll)

    def progress(self, source: str) -> float:
        """How far a stream has delivered, in session time."""
        if source in self.unmapped:
            return -math.inf
        return self.streams[source].progress + self.shifts.get(source, 0.0)

    def reach(self) -> float:
        return max((self.progress(source) for source in self.streams), default=-math.inf)

    def last_arrival(self) -> float:
        return max((s.arrived_at for s in self.streams.values()), default=0.0)

    def copy(self) -> Session:
        """A copy that shares only what the aligner replaces and never changes: progress reports, deltas, spans."""
        return replace(self, streams=dict(self.streams), windows={k: w.copy() for k, w in self.windows.items()},
                       kept={k: w.copy() for k, w in self.kept.items()}, dropped=set(self.dropped),
                       shifts=dict(self.shifts), reporters=dict(self.reporters),
                       unmapped={s: list(d) for s, d in self.unmapped.items()}, utterances=list(self.utterances), held_spans={s: list(h) for s, h in self.held_spans.items()})


class Aligner:
    """Event-time windowing over all sessions. No I/O, no Ray: `now` is passed in.

    Session time is the clock of the session's first stream; a stream whose clock
    disagrees with it by more than the clock tolerance (an offset, a drift that has
    added up, a reset) is mapped onto it through the offsets its sensor actor learns.
    A stream is live unless it sent `end` or has been silent longer than its silence
    limit. Window k of a session covers [k*hop, k*hop + length) of session time and
    closes when the watermark, the least progress of the live streams minus the
    bound, has passed its end, or when each stream that has not is later than its
    clock's reading of end + bound, plus the drop timeout. A configured sensor not
    yet heard from in a session is waited for until the drop timeout has passed since
    the session's first message; after that it counts as dropped. (A configured sensor
    whose modality arrives from other sources is not waited for.) Data for a window
    that has closed is late: counted, and with an allowed lateness merged into the
    window, which is closed again as its next revision.
    """

    def __init__(self, modalities: list[str], sensors: dict[str, str], length_s: float, hop_s: float,
                 timeout_s: float, session_idle_s: float = 60.0, log=None, period_factor: float = 0.0,
                 flush_s: float = 0.0, min_share: float = 0.0, bound_s: float = 0.0, lateness_s: float = 0.0,
                 clock_tolerance_s: float = 0.1, clock_jump_s: float = 1.0, min_silence_s: float = 0.0):
        self.modalities = sorted(modalities)
        self.sensors = dict(sorted(sensors.items()))  # configured sensor name -> modality
        self.length, self.hop, self.timeout = length_s, hop_s, timeout_s
        self.period_factor, self.flush, self.min_share = period_factor, flush_s, min_share
        self.min_silence = min_silence_s
        self.bound, self.lateness, self.clock_tolerance = bound_s, lateness_s, clock_tolerance_s
        self.clock_jump = clock_jump_s
        self.session_idle = session_idle_s
        self.sessions: dict[str, Session] = {}
        self.log = log or structlog.get_logger()
        self.counts = {"closed": 0, "complete": 0, "incomplete": 0, "empty": 0, "late": 0, "revised": 0,
                       "stale_run": 0}
        self.epochs = 0
        self.finished: list[SessionEnd] = []  # sessions forgotten since take_finished()
        self.reported: dict[str, float] = {}  # live sensor actor -> wall time its latest account is as of
        self.heard: dict[str, float] = {}  # live sensor actor -> wall time its latest batch was taken
        self.lost: dict[str, str] = {}  # sensor actor -> the incarnation of it that died last
        self.retired: list[ClosedWindow] = []  # windows of sessions' earlier lives, closed on a new run
        # per session: (run, since, batches) of sources new to it in a later run than its own, kept until one of
        # its own streams begins that run (a replay that adds a source) or the drop timeout passes
        self.later: dict[str, tuple[int, float, list[SensorBatch]]] = {}
        self.news = True  # something came since the last poll of every session
        self.polled_at = -math.inf  # the `now` of the latest poll
        self.wake = math.inf  # while a session is polled: the earliest moment its answer can change by itself

    def copy(self) -> Aligner:
        """A copy of the whole state that later pushes and polls leave as it is (the aligner actor's snapshot),
        made of container copies only: a deep copy of 48 sessions took up to 123 ms, under the lock the ticker
        waits for."""
        twin = copy.copy(self)
        twin.log = self.log
        twin.modalities, twin.sensors = list(self.modalities), dict(self.sensors)
        twin.sessions = {name: session.copy() for name, session in self.sessions.items()}
        twin.counts, twin.reported, twin.lost = dict(self.counts), dict(self.reported), dict(self.lost)
        twin.heard = dict(self.heard)
        twin.finished = list(self.finished)
        twin.later = {name: (run, since, list(batches)) for name, (run, since, batches) in self.later.items()}
        twin.retired = [copy.copy(window) for window in self.retired]  # dispatching stamps them
        return twin

    def __getstate__(self) -> dict:
        """Everything but the logger: Ray serialises the aligner actor's snapshots."""
        return {k: v for k, v in vars(self).items() if k != "log"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.log = structlog.get_logger()

    def lose_sensor(self, sensor: str, incarnation: str) -> None:
        """A live sensor actor died: what it read and had not pushed is gone, so its streams count as silent
        from now until its next life delivers data again (windows waiting for them close, the sensor in
        `dropped`). A batch of the dead life that comes after this adds its data, not its account."""
        if sensor in self.reported:
            self.reported[sensor] = self.heard[sensor] = -math.inf
            self.lost[sensor] = incarnation
            self.news = True

    def regain_sensor(self, sensor: str, incarnation: str) -> None:
        """That life of a sensor actor, taken for dead (silent on another node), answers again: its batches
        count as its account again."""
        if self.lost.get(sensor) == incarnation:
            del self.lost[sensor]
            self.news = True

    def push(self, batch: SensorBatch) -> None:
        self.news = True
        taken: set[int] = set()
        if batch.incarnation != self.lost.get(batch.sensor):  # a dead life's late batch brings data, no account
            if batch.as_of > self.reported.get(batch.sensor, -math.inf):  # (NaN is not: no live sensor's batch)
                self.reported[batch.sensor] = batch.as_of
            took = batch.as_of if math.isnan(batch.taken_at) else batch.taken_at
            if took > self.heard.get(batch.sensor, -math.inf):
                self.heard[batch.sensor] = took
        for progress in batch.progress:
            ending = self.sessions.get(progress.session)
            begins = ending is not None and progress.run != ending.run and self._begins_life(ending, progress,
                                                                                              batch.sensor)
            if begins:
                for delta in batch.deltas:  # this batch's data of the life it ends goes first
                    if delta.session == progress.session and delta.run == ending.run and id(delta) not in taken:
                        self._take(ending, delta)
                        taken.add(id(delta))
                self._end_life(progress.session, ending, progress.run, progress.arrived_at)
            elif ending is not None and progress.run > ending.run and progress.source not in ending.streams:
                deltas = [d for d in batch.deltas if (d.session, d.run) == (progress.session, progress.run)]
                taken.update(id(d) for d in deltas)
                self._keep_for_later(progress.session, progress.run, progress.arrived_at,
                                     SensorBatch(batch.sensor, deltas, [progress], incarnation=batch.incarnation))
                continue
            session = self._life(progress.session, progress.run)
            if session is None:
                continue
            if begins:
                for kept in self._take_later(progress.session, progress.run):
                    self.push(kept)  # what came of the new run from sources new to the session, before this
            if progress.source == session.reference and progress.line is None and (
                    session.streams[progress.source].line is not None or batch.incarnation != session.reference_life):
                session.reference_learning = progress.arrived_at  # its sensor actor restarted: it learns anew
            session.streams[progress.source] = progress
            session.reporters[progress.source] = batch.sensor
            session.first_seen = min(session.first_seen, progress.arrived_at)
            self._follow_clock(progress.session, session, progress)
            if progress.source == session.reference:
                session.reference_life = batch.incarnation
        for delta in batch.deltas:
            if id(delta) not in taken:
                session = self._life(delta.session, delta.run)
                if session is not None:
                    self._take(session, delta)

    def _take(self, session: Session, delta: WindowDelta) -> None:
        if delta.source in session.unmapped:
            session.unmapped[delta.source].append(delta)
        else:
            self._place(session, delta)

    def _begins_life(self, session: Session, progress: StreamProgress, sensor: str) -> bool:
        """Whether a stream's report of another run than the session's ends the session's life. A later run of
        one of its streams, from the sensor actor that reports it, does: that actor took the stream's new run
        only once the stream's next message confirmed it. A stream the life does not know cannot end it while
        any of its streams is live (one stray or forged message from a new source name would silence every
        stream of the session); once none is, whatever comes begins the next life."""
        if progress.source in session.streams:
            return progress.run > session.run and session.reporters.get(progress.source) == sensor
        return session.dropped >= session.streams.keys()

    def _keep_for_later(self, name: str, run: int, now: float, batch: SensorBatch) -> None:
        """Keep a new source's batch of a later run than the session's until one of its own streams begins that
        run (its sensor actor confirms a stream's new run with the stream's next message, so a source the run adds
        is heard first); counted as stale instead if another run's are kept, or too many."""
        kept_run, since, batches = self.later.get(name, (run, now, []))
        if kept_run != run or len(batches) >= LATER_KEPT:
            self._count_stale(name, run, self.sessions[name].run, _items([batch]))
        else:
            self.later[name] = (run, since, batches + [batch])

    def _take_later(self, name: str, run: int) -> list[SensorBatch]:
        kept_run, _, batches = self.later.pop(name, (run, 0.0, []))
        if kept_run == run:
            return batches
        self._count_stale(name, kept_run, run, _items(batches))
        return []

    def _expire_later(self, now: float) -> None:
        """A live stream is heard at least every half drop timeout: a run none of the session's own streams has
        begun in twice that was not a new run of the session."""
        for name in [n for n, (_, since, _) in self.later.items() if now - since > 2 * self.timeout]:
            run, _, batches = self.later.pop(name)
            session = self.sessions.get(name)
            self._count_stale(name, run, session.run if session else None, _items(batches))

    def _count_stale(self, name: str, run: int, session_run: int | None, count: int = 1) -> None:
        for _ in range(count):
            self.counts["stale_run"] += 1
            if worth_a_line(self.counts["stale_run"]):
                self.log.warning("data of another run dropped", session=name, run=run, session_run=session_run,
                                 count=self.counts["stale_run"])

    def _end_life(self, name: str, session: Session, run: int, now: float) -> None:
        """End the session's life (its open windows close with what they have): a new run begins."""
        self.log.info("session begins a new run", session=name, run=run, after_run=session.run)
        self._release_held(session)
        self.retired += self._close_ready(name, session, now, draining=True)
        self.retired += self._revise(name, session, now, draining=True)
        self._forget(name)

    def _life(self, name: str, run: int) -> Session | None:
        """The session's life for data of this run, begun if the session has none; None for data of another
        run than its current life's (counted as stale, dropped)."""
        session = self.sessions.get(name)
        if session is None:
            session = self.sessions[name] = Session(self.epochs, run=run)
            self.epochs += 1
        if session.run != run:
            self._count_stale(name, run, session.run)
            return None
        return session

    def take_finished(self) -> list[SessionEnd]:
        """Sessions forgotten (idle, or drained) since the last call: fusion may forget them too."""
        finished, self.finished = self.finished, []
        return finished

    def _release_held(self, session: Session) -> None:
        """Place the data of streams still held for their clock by their lowest delays, rather than lose it."""
        for source in list(session.unmapped):
            self._map(session, source, session.streams[source].offset - session.first_offset)

    def _forget(self, name: str) -> None:
        session = self.sessions.pop(name)
        self.finished.append(SessionEnd(name, session.epoch, session.closed, session.revised))

    def _place(self, session: Session, delta: WindowDelta) -> None:
        for k, share in self._session_windows(session, delta):
            self._add(session, k, delta, share)

    def _follow_clock(self, name: str, session: Session, stream: StreamProgress) -> None:
        if session.first_offset is None:
            session.first_offset, session.reference = stream.offset, stream.source
            session.reference_learning = stream.arrived_at
        held = stream.source in session.unmapped
        if stream.line is None:
            if stream.source not in session.shifts and not held:
                # its first word: a stream plainly on another clock is held until its clock is known. Lesser
                # disagreements wait for that too: streams sent faster than real time drift apart as well
                if abs(stream.offset - session.first_offset) > self.clock_jump:
                    session.unmapped[stream.source] = []
                else:
                    self._map(session, stream.source, 0.0)
            return
        if stream.source == session.reference:
            return
        if not held and abs(stream.line.drift) > REAL_TIME_DRIFT:
            # not sent in real time (a replay faster than real time, a backlog): its clock cannot be learned
            # from arrivals, so its times are taken as they are
            self._map(session, stream.source, 0.0)
            return
        reference = session.streams[session.reference]
        if reference.line is None and stream.arrived_at < session.reference_learning + self.timeout + LEARNING_S:
            # the reference's lowest delay is not settled yet, at the session's start or after its sensor actor
            # restarted: the stream stays as it was mapped
            return
        if not held and reference.line is not None and abs(reference.line.drift) > REAL_TIME_DRIFT:
            # nor is a reference line no live clock could draw: fitted to its first few seconds, one of them seen
            # only late, or not sent live. Offsets read off it can be a tenth of a second out
            return
        # both offsets are the lowest recent delays, so comparing them now already follows any drift
        disagreement = stream.offset - reference.offset
        shift = disagreement if abs(disagreement) > self.clock_tolerance else 0.0
        before = session.shifts.get(stream.source, 0.0)
        if abs(shift - before) > self.clock_tolerance or (shift == 0.0) != (before == 0.0):
            self.log.info("stream clock mapped", session=name, source=stream.source, shift_s=round(shift, 4),
                          drift_ppm=round(stream.drift * 1e6, 1), resets=stream.resets, reference=session.reference)
        self._map(session, stream.source, shift)

    def _map(self, session: Session, source: str, shift: float) -> None:
        """Set a stream's clock shift; data held until its clock was known goes to its windows now."""
        session.shifts[source] = shift
        for delta in session.unmapped.pop(source, []):
            self._place(session, delta)

    def _session_windows(self, session: Session, delta: WindowDelta) -> list[tuple[int, float]]:
        """The session windows a stream window's sum belongs to, with the share of it each gets: the stream
        window moved by the stream's clock shift, split between the two windows it then straddles."""
        shift = session.shifts.get(delta.source, 0.0)
        if not shift:
            return [(delta.window_id, 1.0)]
        steps = shift / self.hop
        whole = math.floor(steps)
        part = steps - whole
        k = delta.window_id + whole
        if part * self.hop <= self.clock_tolerance:  # within the tolerance the session accepts anyway: no sliver
            return [(k, 1.0)]
        if (1 - part) * self.hop <= self.clock_tolerance:
            return [(k + 1, 1.0)]
        return [(k, 1.0 - part), (k + 1, part)]

    def _add(self, session: Session, k: int, delta: WindowDelta, share: float) -> None:
        total, weight, frames = delta.total * share, delta.weight * share, delta.frames * share
        if session.next_window is None:
            session.next_window = k
        if k >= session.next_window:
            session.windows.setdefault(k, OpenWindow()).add(delta.modality, total, weight, frames, delta.gaps)
            return
        if not delta.frames:  # only news of a seq gap, for a window decided already
            return
        late = math.ceil(frames)  # messages (a clock shift may split one between two windows: then both count it)
        self.counts["late"] += late
        kept = session.kept.get(k)
        if kept is not None:
            kept.window.add(delta.modality, total, weight, frames, delta.gaps)
            kept.late[delta.modality] = kept.late.get(delta.modality, 0) + late

    def poll(self, now: float, due_only: bool = False) -> list[ClosedWindow]:
        """The windows that close at `now`. With `due_only` (a ticker's poll) and nothing pushed since the last
        poll of every session, only the sessions whose `wake_at` has come are looked at: every comparison with
        `now` that can turn by itself notes when it will, so no other session's answer can have changed. A wall
        clock set back can turn them back, so a poll earlier than the last looks at every session."""
        closed, self.retired = self.retired, []
        every = not due_only or self.news or now < self.polled_at
        self.polled_at = now
        if self.later:
            self._expire_later(now)
        for name in list(self.sessions):
            session = self.sessions[name]
            if not every and now < session.wake_at:
                continue
            self.wake = math.inf
            self._track_liveness(name, session, now)
            last = session.last_arrival()
            idle = now - last > self.session_idle
            if idle:
                self._release_held(session)
            else:
                self._note(last + self.session_idle)
            closed.extend(self._close_ready(name, session, now, draining=idle))
            closed.extend(self._revise(name, session, now, draining=idle))
            session.wake_at = self.wake
            if idle:
                self.log.info("session forgotten", session=name, idle_s=round(now - last, 1))
                self._forget(name)
        self.news = False  # (only once every session has been looked at: a poll that raised looks at all again)
        return closed

    def _note(self, at: float) -> None:
        """A moment at which the session being polled can change with nothing new: it is polled again then."""
        if at < self.wake:
            self.wake = at

    def drain(self, now: float) -> list[ClosedWindow]:
        closed, self.retired = self.retired, []
        for name, session in self.sessions.items():
            self._track_liveness(name, session, now)
            self._release_held(session)
            closed.extend(self._close_ready(name, session, now, draining=True))
            closed.extend(self._revise(name, session, now, draining=True))
        for name in list(self.sessions):
            self._forget(name)
        return closed

    def silence_limit(self, stream: StreamProgress) -> float:
        """How long a stream may stay silent: k of its own periods (min_silence at least), plus the spread of
        its delivery delays and the sensor actor's flush interval (the most its news can lag), at most the
        timeout."""
        if self.period_factor and math.isfinite(stream.period):
            periods = max(self.period_factor * stream.period, self.min_silence)
            return min(self.timeout, self.flush + periods + stream.jitter)
        return self.timeout

    def _live(self, session: Session, source: str, now: float) -> bool:
        """Whether a stream is live: not ended, and not silent for longer than its silence limit. A live sensor
        actor's streams are judged on its latest account (less the flush interval, which only delays accounts):
        as of the last moment it had read everything that had arrived, so an actor behind its socket (a machine
        out of CPU for a moment) delays its news, not its sources. The account counts while the actor's latest
        batch is no older than the drop timeout."""
        stream = session.streams[source]
        if stream.ended:
            return False
        reporter = session.reporters.get(source)
        reported = self.reported.get(reporter)
        if reported is None:
            limit = self.silence_limit(stream)
            live = now - stream.arrived_at <= limit
            if live:
                self._note(stream.arrived_at + limit)
            return live
        silent = reported - stream.arrived_at
        if silent > self.silence_limit(stream) - self.flush:
            return False
        live = now - self.heard[reporter] <= self.timeout
        if live:
            self._note(self.heard[reporter] + self.timeout)
        return live

    def _too_sparse(self, session: Session, modality: str, frames: float, start: float, end: float) -> bool:
        """Fewer frames than min_share of what the periods of the modality's streams that delivered the
        window promise for it (a stream that dropped or ended before the window's end promises nothing)."""
        if not self.min_share:
            return False
        rates = [1 / s.period for source, s in session.streams.items()
                 if s.modality == modality and math.isfinite(s.period) and session.progress(source) >= end]
        expected = (end - start) * sum(rates)
        return expected > 0 and frames < self.min_share * expected

    def _track_liveness(self, name: str, session: Session, now: float) -> None:
        for source, stream in session.streams.items():
            live = self._live(session, source, now)
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
        """Whether the watermark has passed `end` (session time), or every stream behind it is overdue."""
        if now < session.first_seen + self.timeout and self._unheard(session):
            self._note(session.first_seen + self.timeout)
            return False
        due = end + self.bound
        for source, stream in session.streams.items():
            if session.progress(source) >= due or not self._live(session, source, now):
                continue
            if source in session.unmapped:  # on another clock, not known yet: wait until it can be learned
                deadline = due + session.first_offset + self.timeout + LEARNING_S
            else:
                deadline = due - session.shifts.get(source, 0.0) + stream.offset + self.timeout
            if now < deadline:
                self._note(deadline)
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
            if k not in session.windows:
                session.next_window = self._past_empty(session, k, reach, now, draining)
                self.counts["empty"] += session.next_window - k
                continue
            window = session.windows.pop(k)
            session.next_window = k + 1
            result = self._closed(name, session, k, start, end, window, now)
            if self.lateness and not draining and result is not None:
                session.kept[k] = KeptWindow(window, session.closed)
            if result is None:
                self.counts["empty"] += 1
                continue
            result.seq = session.closed
            closed.append(result)
            session.closed += 1
            self.counts["closed"] += 1
            self.counts["incomplete" if result.missing else "complete"] += 1
        return closed

    def _past_empty(self, session: Session, k: int, reach: float, now: float, draining: bool) -> int:
        """The first window from k on that holds data or cannot close yet: a stream's pause or a clock jump
        can leave millions of empty windows, so this searches instead of stepping."""
        later = [j for j in session.windows if j > k]
        stop = min(later) if later else k + 1
        if draining:
            return stop
        stop = min(stop, math.ceil(reach / self.hop)) if later else math.ceil(reach / self.hop)
        low, high = k + 1, max(stop, k + 1)  # window k itself is closable
        while low < high:
            middle = (low + high) // 2
            if self._closable(session, middle * self.hop + self.length, now):
                low = middle + 1
            else:
                high = middle
        return low

    @staticmethod
    def _sliver(window: OpenWindow, modality: str) -> bool:
        """Whether a modality holds only a sliver here: under a tenth of a message's span (a stream whose
        clock runs a little off the session's grazes the next window), or under half a message's share of a
        stream window moved by a clock shift."""
        return window.weights[modality] < SLIVER_WEIGHT or window.frames[modality] < 0.5

    def _slack(self, session: Session, source: str) -> float:
        """How far short of a window's end a stream may stop and still count as having delivered it: a mapped
        clock is only good to the tolerance."""
        return self.clock_tolerance if session.shifts.get(source) else 1e-9  # and float rounding

    def _revise(self, name: str, session: Session, now: float, draining: bool) -> list[ClosedWindow]:
        """Close again, as a new revision, every kept window that late data reached; forget those whose
        allowed lateness is over."""
        revised = []
        for k in sorted(session.kept):
            kept = session.kept[k]
            if kept.late:
                result = self._closed(name, session, k, k * self.hop, k * self.hop + self.length, kept.window, now)
                late, kept.late = kept.late, {}
                if result is not None:
                    kept.revision += 1
                    result.revision, result.seq, result.late = kept.revision, kept.seq, late
                    revised.append(result)
                    session.revised += 1
                    self.counts["revised"] += 1
            end = k * self.hop + self.length
            if draining or self._closable(session, end + self.lateness, now):
                del session.kept[k]
        return revised

    def _closed(self, name: str, session: Session, k: int, start: float, end: float, window: OpenWindow | None,
                now: float) -> ClosedWindow | None:
        """The closed form of window k over [start, end); None when it holds no data."""
        observed = [m for m in window.totals if not self._sliver(window, m)] if window is not None else []
        if not observed:
            return None
        reliable = [m for m in observed if not self._too_sparse(session, m, window.frames[m], start, end)] or observed
        features = {m: (window.totals[m] / window.weights[m]).astype(np.float32) for m in reliable}
        present = sorted(features)
        missing = [m for m in self.modalities if m not in features]
        dropped = sorted({source for source in session.streams if session.progress(source) < end - self._slack(
            session, source)} | set(self._unheard(session)))
        return ClosedWindow(name, k, start, end, features, present, missing, dropped, now, epoch=session.epoch,
                            seq_gaps=dict(sorted(window.gaps.items())))

    def stream_states(self) -> dict[str, dict[str, tuple[str, str]]]:
        """session -> source -> (modality, state): live, dropped or ended as last tracked; a configured sensor
        not heard in the session, nor its modality, is `unheard`."""
        states = {}
        for name, session in self.sessions.items():
            streams = {source: (stream.modality, "ended" if stream.ended else
                                "dropped" if source in session.dropped else "live")
                       for source, stream in session.streams.items()}
            streams |= {sensor: (self.sensors[sensor], "unheard") for sensor in self._unheard(session)}
            states[name] = streams
        return states

    def stats(self) -> dict:
        return {**self.counts, "sessions": len(self.sessions),
                "open_windows": sum(len(s.windows) for s in self.sessions.values())}


class UtteranceAligner(Aligner):
    """Utterance windows: each window is the span of one text segment (what emotion data sets label), the
    other modalities' data within it weighted by overlap. Sensor actors sum into slots of slot_s; a window
    takes the slots it overlaps. While no text stream is live (the speech recogniser died, or there is
    none), windows of fallback_s tile the time after the last utterance instead, so the session still gets
    decisions. Window ids count a session's windows: 0, 1, 2, ...
    """

    MAX_UTTERANCE_S = 60.0  # slots are kept this long behind the latest data, for utterances still to come

    def __init__(self, modalities: list[str], sensors: dict[str, str], slot_s: float, fallback_s: float,
                 timeout_s: float, **rules):
        super().__init__(modalities, sensors, slot_s, slot_s, timeout_s, **rules)
        self.fallback = fallback_s

    def push(self, batch: SensorBatch) -> None:
        super().push(batch)
        for span in batch.spans:
            session = self.sessions.get(span.session)
            if session is None or session.run != span.run:
                kept = self.later.get(span.session)
                if kept is not None and kept[0] == span.run:
                    self._keep_for_later(span.session, span.run, kept[1],
                                         SensorBatch(batch.sensor, [], [], spans=[span], incarnation=batch.incarnation))
                else:
                    self._count_stale(span.session, span.run, session.run if session else None)
                continue
            if span.source in session.unmapped:
                session.held_spans.setdefault(span.source, []).append(span)
            else:
                self._add_utterance(session, span)

    def _map(self, session: Session, source: str, shift: float) -> None:
        super()._map(session, source, shift)
        for span in session.held_spans.pop(source, []):
            self._add_utterance(session, span)

    def _add_utterance(self, session: Session, span: Span) -> None:
        shift = session.shifts.get(span.source, 0.0)
        bisect.insort(session.utterances, (span.start + shift, span.end + shift))

    def _close_ready(self, name: str, session: Session, now: float, draining: bool) -> list[ClosedWindow]:
        if session.next_window is None:
            return []
        if session.decided_until is None:
            session.decided_until = session.next_window * self.hop
        closed = []
        while session.utterances and (draining or self._closable(session, session.utterances[0][1], now)):
            start, end = session.utterances.pop(0)
            start = max(start, session.tiled_until)  # what the time tiles already decided is not decided twice
            if end > start:
                closed += self._close_span(name, session, start, end, now)
            session.decided_until = max(session.decided_until, end)
        text_live = any(s.modality == "text" and self._live(session, source, now)
                        for source, s in session.streams.items())
        if not session.utterances and (draining or not text_live):
            reach = session.reach()
            while session.decided_until < reach and (draining or self._closable(
                    session, session.decided_until + self.fallback, now)):
                start = session.decided_until
                session.decided_until = session.tiled_until = start + self.fallback
                closed += self._close_span(name, session, start, session.tiled_until, now)
        self._forget_slots(session)
        return closed

    def _close_span(self, name: str, session: Session, start: float, end: float, now: float) -> list[ClosedWindow]:
        window = OpenWindow()
        for k in range(math.floor(start / self.hop), math.ceil(end / self.hop)):
            slot = session.windows.get(k)
            share = (min(end, (k + 1) * self.hop) - max(start, k * self.hop)) / self.hop
            if slot is None or share <= 0:
                continue
            for modality, total in slot.totals.items():
                window.add(modality, total * share, slot.weights[modality] * share, slot.frames[modality] * share,
                           slot.gaps.get(modality, 0))
        result = self._closed(name, session, session.next_id, start, end, window, now)
        session.next_id += 1
        if result is None:
            self.counts["empty"] += 1
            return []
        result.seq = session.closed
        session.closed += 1
        self.counts["closed"] += 1
        self.counts["incomplete" if result.missing else "complete"] += 1
        return [result]

    def _forget_slots(self, session: Session) -> None:
        """Drop slots no window can need any more: before every pending utterance, the time already tiled,
        and MAX_UTTERANCE_S behind the latest data (data for them later counts as late)."""
        keep_from = min([start for start, _ in session.utterances]
                        + [max(session.tiled_until, session.reach() - self.MAX_UTTERANCE_S)])
        if not math.isfinite(keep_from):
            return
        first = math.floor(keep_from / self.hop)
        if first > session.next_window:
            for k in [k for k in session.windows if k < first]:
                del session.windows[k]
            session.next_window = first


def _items(batches: list[SensorBatch]) -> int:
    """Reports, window contributions and spans in these batches (what `stale_run` counts)."""
    return sum(len(b.progress) + len(b.deltas) + len(b.spans) for b in batches)
