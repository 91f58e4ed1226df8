"""The virtual clock: the daemon's pipeline on a recording's timeline, the same on every run.

`mmfuse-replay --virtual-clock` sends every message with its recorded receive time as a
third frame and, between messages, a tick every TICK_S of recording time to every
sensor (topic `clock`). A sensor takes each tick as `now`: it hands the aligner a batch
when one is due (the live rule, SensorIngest.push_due) and otherwise reports at least
every flush interval how far it has got. The aligner applies batches and polls in
(tick, sensor) order once every sensor has reported up to that tick, so neither Ray's
scheduling nor the machine's load can change a decision. The last tick is `final`:
the aligner then drains every open window at that time and all state is reset, ready
for the next replay. `mmfuse-eval --log` runs the same two classes in one process.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack

from mmfuse.frames import ClosedWindow, SensorBatch
from mmfuse.wire import MAX_TIME_S

if TYPE_CHECKING:
    from mmfuse.config import DaemonConfig

TICK_S = 0.01       # as the live aligner's ticker
TICK_TOPIC = b"clock"
def _plausible(t) -> bool:
    """A time a replay's clock can show: finite, and seconds (as the wire protocol's `t`)."""
    return type(t) in (int, float) and math.isfinite(t) and abs(t) <= MAX_TIME_S


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    final: bool = False


def tick_frames(tick: Tick) -> list[bytes]:
    return [TICK_TOPIC, msgpack.packb({"t": tick.now, "final": tick.final})]


def parse_tick(frames: list[bytes]) -> Tick | None:
    try:
        body = msgpack.unpackb(frames[1])
        t, final = body["t"], body["final"]
    except Exception:  # a malformed tick is counted by the caller like any malformed message
        return None
    return Tick(float(t), final) if _plausible(t) and type(final) is bool else None


class SensorTicks:
    """A sensor's side of the virtual clock: whether a tick hands over a batch, a report, or nothing."""

    def __init__(self, ingest, batch_interval_s: float, flush_interval_s: float, replay: int = 0):
        self.ingest = ingest
        self.batch_interval, self.flush_interval = batch_interval_s, flush_interval_s
        self.replay = replay  # how many replays this sensor has finished before this one
        self.last_push = self.last_report = -math.inf

    def tick(self, tick: Tick) -> tuple[bool, SensorBatch | None]:
        """(report, batch) at this tick; a report carries the batch, if any, and the tick's time."""
        batch = None
        if tick.final or self.ingest.push_due(tick.now - self.last_push, self.batch_interval, self.flush_interval):
            batch = self.ingest.take_batch()
            self.last_push = tick.now
        report = tick.final or batch is not None or tick.now - self.last_report >= self.flush_interval
        if report:
            self.last_report = tick.now
            self.ingest.forget_idle(tick.now)
        return report, batch


class AlignerTicks:
    """The aligner's side: batches and polls in (tick, sensor) order, each tick once every sensor has passed it."""

    def __init__(self, aligner, sensors: list[str]):
        self.aligner = aligner
        self.sensors = sorted(sensors)
        self.reset()

        self.replay = 0
        self.early: list[tuple[str, Tick, SensorBatch | None, int]] = []  # reports for later replays

    def copy(self, aligner) -> AlignerTicks:
        """A copy that drives `aligner` (a copy of its own); the batches held are not changed, so they are shared."""
        twin = AlignerTicks(aligner, self.sensors)
        twin.events, twin.reached, twin.finals = list(self.events), dict(self.reached), set(self.finals)
        twin.replay, twin.early = self.replay, list(self.early)
        return twin

    def reset(self) -> None:
        self.events: list[tuple[float, str, SensorBatch | None]] = []
        self.reached = dict.fromkeys(self.sensors, -math.inf)
        self.finals: set[str] = set()

    def report(self, sensor: str, tick: Tick, batch: SensorBatch | None,
               replay: int = 0) -> tuple[list[ClosedWindow], bool]:
        """Closed windows this report lets out, and whether a replay is over (every sensor sent its final).
        `replay` counts the sensor's finals before this tick: a sensor that has finished one replay may
        report on the next while another still works through the last."""
        if replay > self.replay:
            self.early.append((sensor, tick, batch, replay))
            return [], False
        heapq.heappush(self.events, (tick.now, sensor, batch))  # one report per sensor and tick: no ties
        self.reached[sensor] = tick.now
        if tick.final:
            self.finals.add(sensor)
        frontier = min(self.reached.values())
        closed = []
        while self.events and self.events[0][0] <= frontier:
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, _, pending = heapq.heappop(self.events)
                if pending is not None:
                    self.aligner.push(pending)
            closed += self.aligner.poll(now)
        if self.finals != set(self.sensors):
            return closed, False
        closed += self.aligner.drain(frontier)
        self.reset()
        self.replay += 1
        early, self.early = self.early, []
        for report in early:
            closed += self.report(*report)[0]
        return closed, True


def replay_ticks(received: list[float], quiet_s: float, settled_s: float = math.inf):
    """Message indices in order, with the ticks due before each: every tick at or before a message's receive
    time comes first. After the last message ticks go on for quiet_s (so that silent streams time out as they
    would live), then the final tick. Where no message comes for longer than settled_s, by when every stream and
    session is forgotten, the ticks from then to the next message, which can change nothing, are left out: a
    recording whose clock jumped a day ahead is not 8.6 million ticks long."""
    if not received:
        return
    start, i = received[0], 0
    for index, at in enumerate(received):
        if index and at - received[index - 1] > settled_s:
            while start + i * TICK_S <= received[index - 1] + settled_s:
                yield Tick(start + i * TICK_S)
                i += 1
            i = max(i, math.floor((at - start) / TICK_S))
        while start + i * TICK_S <= at:
            yield Tick(start + i * TICK_S)
            i += 1
        yield index
    while start + i * TICK_S <= received[-1] + quiet_s:
        yield Tick(start + i * TICK_S)
        i += 1
    yield Tick(start + i * TICK_S, final=True)


def replay_times(config: DaemonConfig) -> tuple[float, float]:
    """A replay's quiet_s and settled_s (replay_ticks): how long after the last message the clock runs on, enough
    for every stream to time out; and how long after any message until nothing it left is remembered."""
    quiet = config.drop.timeout_s + config.pipeline.flush_interval_ms / 1000 + 2 * TICK_S
    return quiet, config.pipeline.stream_idle_s + quiet
