"""The daemon's pipeline in one process on a virtual clock: a recording's receive times.

The same I/O-free classes the actors wrap (SensorIngest, Aligner, WindowRestorer,
FusionHead), driven by the same virtual clock as `mmfuse-daemon --virtual-clock` fed by
`mmfuse-replay --virtual-clock` (mmfuse.virtual_clock): messages in receive-time order,
a tick every TICK_S between them. A recording gives the same decisions on every run,
on any machine, whatever its load, and the same as a daemon replaying it on the
virtual clock. `mmfuse-eval --log` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from mmfuse.actors.aligner import Aligner
from mmfuse.actors.fusion import FusionHead
from mmfuse.actors.restorer import WindowRestorer
from mmfuse.actors.sensor import sensor_ingest
from mmfuse.bundle import Bundle
from mmfuse.daemon.config import DaemonConfig
from mmfuse.recording import RecordedMessage
from mmfuse.virtual_clock import AlignerTicks, SensorTicks, Tick, quiet_time, replay_ticks
from mmfuse.wire import Decision


@dataclass
class VirtualRun:
    decisions: list[Decision]
    rejected: dict[str, dict[str, int]]   # sensor -> reason -> count
    aligner: dict


class VirtualPipeline:
    def __init__(self, config: DaemonConfig, bundle: Bundle):
        self.config = config
        log = structlog.get_logger().bind(virtual=True)
        pipeline = config.pipeline
        towers = bundle.towers(sorted({s.modality for s in config.sensors}))
        sections = {k: getattr(config, k).model_dump() for k in ("window", "pipeline", "clock")}
        self.ingests = {s.name: sensor_ingest(s.model_dump(), sections["window"], sections["pipeline"],
                                              sections["clock"], bundle.modalities[s.modality]["dim"],
                                              towers.get(s.modality), log.bind(sensor=s.name))
                        for s in config.sensors}
        self.ticks = {name: SensorTicks(ingest, pipeline.batch_interval_ms / 1000, pipeline.flush_interval_ms / 1000)
                      for name, ingest in self.ingests.items()}
        self.aligner = Aligner.from_config(sorted(bundle.modalities), {s.name: s.modality for s in config.sensors},
                                           config.window.model_dump(), config.drop.model_dump(), pipeline.model_dump(),
                                           config.clock.model_dump(), log)
        self.aligner_ticks = AlignerTicks(self.aligner, list(self.ingests))
        restorer = config.restorer
        self.restorer = WindowRestorer(bundle, restorer.method, restorer.overrides(), restorer.abstain_spread)
        self.fusion = FusionHead(bundle, restorer.method)

    def _tick(self, tick: Tick) -> list[Decision]:
        decisions = []
        for name in sorted(self.ticks):
            report, batch = self.ticks[name].tick(tick)
            if report:
                windows, _ = self.aligner_ticks.report(name, tick, batch)
                decisions += self._decide(windows)
        return decisions

    def _decide(self, windows) -> list[Decision]:
        incomplete = [w for w in windows if not w.complete]
        if incomplete:
            self.restorer.restore(incomplete)
        decisions = self.fusion.decide(windows)
        self.fusion.finish(self.aligner.take_finished())
        return decisions

    def run(self, messages: list[RecordedMessage]) -> VirtualRun:
        """Decisions for the messages of configured sensors (others are skipped, as mmfuse-replay does)."""
        messages = [m for m in messages if m.sensor in self.ingests]
        decisions: list[Decision] = []
        quiet = quiet_time(self.config.drop.timeout_s, self.config.pipeline.flush_interval_ms / 1000)
        for item in replay_ticks([m.received for m in messages], quiet):
            if isinstance(item, Tick):
                decisions += self._tick(item)
            else:
                message = messages[item]
                self.ingests[message.sensor].ingest([message.topic, message.payload], message.received)
        return VirtualRun(decisions, {name: dict(i.rejected.counts) for name, i in self.ingests.items()},
                          self.aligner.stats())


def receive_offset(messages: list[RecordedMessage]) -> float:
    """Lowest (receive time - delivered-up-to time), as the daemon estimates a stream's offset: maps the
    sensors' clock onto the recording's."""
    return min(m.received - m.reached for m in messages) if messages else 0.0
