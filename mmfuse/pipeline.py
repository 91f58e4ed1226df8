"""The daemon's pipeline, declared once: its stages, the frames each takes and hands on, and where.

    sensor ──SensorBatch──▶ aligner ──ClosedWindow──▶ restorer ──ClosedWindow──▶ fusion ──Decision──▶ publisher
                              ▲   └──────────complete ClosedWindow──────────────────▲                    │
                              └───────────────────────── acknowledged WindowKeys ──────────────────────┘

The Ray runner (mmfuse.daemon.supervisor: one actor per stage, one per configured
sensor) and the in-process runner below (`mmfuse-eval --log`, the tests) both build
from PIPELINE and the stage builders here, so both run the same classes wired the
same way. The restorer and fusion stages load the same bundle and stand in for each
other while one is down (`route`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from mmfuse import wire
from mmfuse.aligner import Aligner, UtteranceAligner
from mmfuse.config import DaemonConfig, SensorConfig
from mmfuse.frames import ClosedWindow, SensorBatch, WindowKey
from mmfuse.ingest import SensorIngest
from mmfuse.media import MediaEncoder
from mmfuse.virtual_clock import AlignerTicks, SensorTicks, Tick, replay_ticks, replay_times


@dataclass(frozen=True)
class Stage:
    name: str             # also its actor's name; the sensor stage has one actor per sensor, sensor-<name>
    takes: type
    gives: type
    to: tuple[str, ...]   # the stages it hands its frames on to
    actor: str            # its Ray actor, module:class (imported where it runs)
    model: bool = False   # runs the bundle's models: imports torch, may ask for a GPU
    stands_in_for: str | None = None  # the stage whose work it takes over while that one is down


class Pipeline:
    def __init__(self, stages: list[Stage]):
        self.stages = {stage.name: stage for stage in stages}
        for stage in stages:
            unknown = [name for name in stage.to + (stage.stands_in_for,) if name and name not in self.stages]
            if unknown:
                raise ValueError(f"stage {stage.name} hands on to unknown stage(s) {unknown}")

    def __iter__(self):
        return iter(self.stages.values())

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def route(self, window: ClosedWindow, down: frozenset[str] = frozenset()) -> str:
        """Where the aligner hands a closed window: incomplete ones to the restorer, complete ones to fusion;
        while that stage is down, to the one that stands in for it."""
        first = "fusion" if window.complete else "restorer"
        if first in down:
            return next((s.name for s in self if s.stands_in_for == first and s.name not in down), first)
        return first


PIPELINE = Pipeline([
    Stage("sensor", takes=wire.SensorMessage, gives=SensorBatch, to=("aligner",),
          actor="mmfuse.actors.sensor:SensorActor"),
    Stage("aligner", takes=SensorBatch, gives=ClosedWindow, to=("restorer", "fusion"),
          actor="mmfuse.actors.aligner:AlignerActor"),
    Stage("restorer", takes=ClosedWindow, gives=ClosedWindow, to=("fusion",),
          actor="mmfuse.actors.restorer:RestorerActor", model=True, stands_in_for="fusion"),
    Stage("fusion", takes=ClosedWindow, gives=wire.Decision, to=("publisher",),
          actor="mmfuse.actors.fusion:FusionActor", model=True, stands_in_for="restorer"),
    Stage("publisher", takes=wire.Decision, gives=WindowKey, to=("aligner",),
          actor="mmfuse.actors.publisher:PublisherActor"),
])


def sensor_grid(config: DaemonConfig) -> tuple[float, float]:
    """(length, hop) of what sensor actors sum into: the windows, or the slots utterance windows are cut from."""
    window = config.window
    return (window.slot_s,) * 2 if window.mode == "utterance" else (window.length_s, window.hop_s)


def build_ingest(config: DaemonConfig, sensor: SensorConfig, dim: int | None, tower=None, log=None,
                 keys=None) -> SensorIngest:
    """`keys` (mmfuse.security.DaemonKeys) when sensors authenticate: then a sensor takes frames from its own
    key only. With or without them, none that name another configured sensor as their source: every sensor has
    an endpoint of its own, and the aligner knows a session's streams by source name."""
    media = None if tower is None else MediaEncoder(sensor.modality, tower,
                                                    config.window.length_s / sensor.frames_per_window)
    others = frozenset(s.name for s in config.sensors if s.name != sensor.name)
    return SensorIngest(sensor.name, sensor.modality, *sensor_grid(config), dim, config.pipeline.max_payload_bytes,
                        log, media, config.clock.jump_s, spans=config.window.mode == "utterance",
                        idle_s=config.pipeline.stream_idle_s,
                        max_span_s=max(60.0, 10 * config.window.length_s),  # a minute, or ten long windows
                        sender_key=None if keys is None else keys.sender_key(sensor.name), other_sensors=others,
                        keep_accepted=config.recorder is not None)


def build_aligner(config: DaemonConfig, modalities: list[str], log=None) -> Aligner:
    window, drop = config.window, config.drop
    sensors = {s.name: s.modality for s in config.sensors}
    rules = dict(session_idle_s=config.pipeline.session_idle_s, log=log, period_factor=drop.period_factor,
                 min_silence_s=drop.min_silence_s,
                 flush_s=config.pipeline.flush_interval_ms / 1000, min_share=drop.min_share,
                 bound_s=window.watermark_bound_s, clock_tolerance_s=config.clock.tolerance_s,
                 clock_jump_s=config.clock.jump_s)
    if window.mode == "utterance":
        return UtteranceAligner(modalities, sensors, window.slot_s, window.length_s, drop.timeout_s, **rules)
    return Aligner(modalities, sensors, window.length_s, window.hop_s, drop.timeout_s,
                   lateness_s=window.allowed_lateness_s, **rules)


def build_restorer(config: DaemonConfig, bundle, device: str = "cpu"):
    from mmfuse.restoration import WindowRestorer

    restorer = config.restorer
    return WindowRestorer(bundle, restorer.method, restorer.overrides(), restorer.abstain_spread, device)


def build_fusion(config: DaemonConfig, bundle, stand_in=None, device: str = "cpu"):
    from mmfuse.fusion import FusionHead

    return FusionHead(bundle, config.restorer.method, stand_in, config.restorer.abstain_below, device)


@dataclass
class InProcessRun:
    closed: list[ClosedWindow]
    decisions: list[wire.Decision]
    rejected: dict[str, dict[str, int]]   # sensor -> reason -> count
    unsupported: dict[str, dict[str, int]]  # sensor -> encoding -> data messages it cannot encode
    aligner: dict


@dataclass
class InProcessPipeline:
    """PIPELINE in one process on a virtual clock (mmfuse.virtual_clock): messages in receive-time order, a tick
    every TICK_S between them, every stage called in turn. A recording gives the same decisions on every run, on
    any machine, whatever its load, and the same as a daemon replaying it on the virtual clock. Without a bundle
    it runs the stages up to the aligner (features of `dims` dimensions) and gives closed windows only."""

    config: DaemonConfig
    bundle: object | None = None
    dims: dict[str, int] | None = None
    log: object = None
    decisions: list[wire.Decision] = field(default_factory=list)
    closed: list[ClosedWindow] = field(default_factory=list)

    def __post_init__(self):
        config, bundle = self.config, self.bundle
        log = self.log or structlog.get_logger().bind(virtual=True)
        dims = self.dims or {m: spec["dim"] for m, spec in bundle.modalities.items()}
        towers = bundle.towers(config.modalities) if bundle is not None else {}
        self.ingests = {s.name: build_ingest(config, s, dims[s.modality], towers.get(s.modality),
                                             log.bind(sensor=s.name)) for s in config.sensors}
        batch_s, flush_s = config.pipeline.batch_interval_ms / 1000, config.pipeline.flush_interval_ms / 1000
        self.ticks = {name: SensorTicks(ingest, batch_s, flush_s) for name, ingest in self.ingests.items()}
        modalities = sorted(bundle.modalities) if bundle is not None else config.modalities
        self.aligner = build_aligner(config, modalities, log)
        self.aligner_ticks = AlignerTicks(self.aligner, list(self.ingests))
        self.stages = {}
        if bundle is not None:
            restorer = build_restorer(config, bundle)
            fusion = build_fusion(config, bundle)
            self.stages = {"restorer": restorer.restore, "fusion": fusion.decide, "publisher": self.decisions.extend}
            self.finish = fusion.finish

    def run(self, messages: list[tuple[float, str, list[bytes]]]) -> InProcessRun:
        """Closed windows and decisions for (receive time, sensor, frames) in receive-time order; messages of
        sensors the configuration does not name are skipped, as mmfuse-replay does."""
        messages = [m for m in messages if m[1] in self.ingests]
        for item in replay_ticks([m[0] for m in messages], *replay_times(self.config)):
            if isinstance(item, Tick):
                self._tick(item)
            else:
                received, sensor, frames = messages[item]
                self.ingests[sensor].ingest(frames, received)
        return InProcessRun(self.closed, self.decisions, {n: dict(i.rejected.counts) for n, i in self.ingests.items()},
                            {n: dict(i.unsupported.counts) for n, i in self.ingests.items()}, self.aligner.stats())

    def _tick(self, tick: Tick) -> None:
        for name in sorted(self.ticks):
            report, batch = self.ticks[name].tick(tick)
            if report:
                windows, _ = self.aligner_ticks.report(name, tick, batch)
                self.closed += windows
                self._hand_on(windows)

    def _hand_on(self, windows: list[ClosedWindow]) -> None:
        if not self.stages:
            return
        for stage in ("restorer", "fusion"):
            routed = [w for w in windows if PIPELINE.route(w) == stage]
            if routed:
                self._send(stage, routed)
        self.finish(self.aligner.take_finished())

    def _send(self, stage: str, frames: list) -> None:
        """Call a stage, then hand what it gives on along the declaration (fusion's decisions go to the
        publisher, here a list)."""
        given = self.stages[stage](frames)
        for onward in PIPELINE[stage].to:
            if given and onward in self.stages:
                self._send(onward, given)


def receive_offset(messages: list) -> float:
    """Lowest (receive time - delivered-up-to time) of recorded messages, as the daemon estimates a stream's
    offset: maps the sensors' clock onto the recording's."""
    return min(m.received - m.reached for m in messages) if messages else 0.0
