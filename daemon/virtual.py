"""The daemon's pipeline in one process on a virtual clock: a recording's receive times.

The same I/O-free classes the actors wrap (SensorIngest, Aligner, WindowRestorer,
FusionHead), driven message by message in receive-time order with the clock ticking
in fixed steps between messages, so a recording gives the same decisions on every run
and on any machine, whatever its load. `mmfuse-eval --log` uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import structlog

from mmfuse.actors.aligner import Aligner
from mmfuse.actors.fusion import FusionHead
from mmfuse.actors.restorer import WindowRestorer
from mmfuse.actors.sensor import SensorIngest
from mmfuse.bundle import Bundle
from mmfuse.daemon.config import DaemonConfig
from mmfuse.media import MediaEncoder
from mmfuse.recording import RecordedMessage
from mmfuse.wire import Decision


@dataclass
class VirtualRun:
    decisions: list[Decision]
    rejected: dict[str, dict[str, int]]   # sensor -> reason -> count
    aligner: dict


class VirtualPipeline:
    TICK_S = 0.01  # as the aligner actor's ticker

    def __init__(self, config: DaemonConfig, bundle: Bundle):
        self.config = config
        log = structlog.get_logger().bind(virtual=True)
        window, pipeline = config.window, config.pipeline
        towers = bundle.towers(sorted({s.modality for s in config.sensors}))
        self.ingests = {}
        for sensor in config.sensors:
            tower = towers.get(sensor.modality)
            media = MediaEncoder(sensor.modality, tower, window.length_s / sensor.frames_per_window) if tower else None
            self.ingests[sensor.name] = SensorIngest(sensor.name, sensor.modality, window.length_s, window.hop_s,
                                                     bundle.modalities[sensor.modality]["dim"],
                                                     pipeline.max_payload_bytes, log.bind(sensor=sensor.name), media)
        self.aligner = Aligner(sorted(bundle.modalities), {s.name: s.modality for s in config.sensors},
                               window.length_s, window.hop_s, config.drop.timeout_s, pipeline.session_idle_s, log,
                               config.drop.period_factor, pipeline.flush_interval_ms / 1000, config.drop.min_share)
        restorer = config.restorer
        self.restorer = WindowRestorer(bundle, restorer.method, restorer.overrides(), restorer.abstain_spread)
        self.fusion = FusionHead(bundle, restorer.method, pipeline.session_idle_s)
        self.last_push = dict.fromkeys(self.ingests, -math.inf)

    def _tick(self, now: float) -> list[Decision]:
        pipeline = self.config.pipeline
        for name, ingest in self.ingests.items():
            if ingest.push_due(now - self.last_push[name], pipeline.batch_interval_ms / 1000,
                               pipeline.flush_interval_ms / 1000):
                batch = ingest.take_batch()
                if batch is not None:
                    self.aligner.push(batch)
                self.last_push[name] = now
        return self._decide(self.aligner.poll(now), now)

    def _decide(self, windows, now: float) -> list[Decision]:
        if not windows:
            return []
        incomplete = [w for w in windows if not w.complete]
        if incomplete:
            self.restorer.restore(incomplete)
        return self.fusion.decide(sorted(windows, key=lambda w: (w.session, w.seq)), now)

    def run(self, messages: list[RecordedMessage]) -> VirtualRun:
        decisions: list[Decision] = []
        if messages:
            clock = messages[0].received
            for message in messages:
                while clock <= message.received:
                    decisions += self._tick(clock)
                    clock += self.TICK_S
                ingest = self.ingests.get(message.sensor)
                if ingest is not None:
                    ingest.ingest([message.topic, message.payload], message.received)
            quiet_until = messages[-1].received + self.config.drop.timeout_s + \
                self.config.pipeline.flush_interval_ms / 1000 + 2 * self.TICK_S
            while clock <= quiet_until:  # let silent streams time out as they would live
                decisions += self._tick(clock)
                clock += self.TICK_S
            for ingest in self.ingests.values():
                batch = ingest.take_batch()
                if batch is not None:
                    self.aligner.push(batch)
            decisions += self._decide(self.aligner.drain(clock), clock)
        return VirtualRun(decisions, {name: dict(i.rejected.counts) for name, i in self.ingests.items()},
                          self.aligner.stats())


def receive_offset(messages: list[RecordedMessage]) -> float:
    """Lowest (receive time - delivered-up-to time), as the daemon estimates a stream's offset: maps the
    sensors' clock onto the recording's."""
    return min(m.received - m.reached for m in messages) if messages else 0.0
