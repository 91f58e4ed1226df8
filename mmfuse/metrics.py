"""The daemon's Prometheus metrics, declared once. Each actor counts its own where things happen: the
publisher its decisions, the restorer its batches, and the sensors and the aligner turn the counts they
keep anyway into metric families when asked (no cost per message). The driver asks every actor about
once a second, one Ray call each (mmfuse.daemon.monitor), and serves the sum. No per-session labels:
sessions are unbounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mmfuse import wire

disable_created_metrics()  # one series per counter, not a second one with its creation time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RESTORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STREAM_STATES = ("live", "dropped", "ended", "unheard")


class DecisionMetrics:
    """The publisher's: windows published by outcome, and each decision's latency."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.windows = Counter("mmfuse_windows", "Windows decided and published, by outcome", ["outcome"],
                               registry=self.registry)
        for outcome in wire.OUTCOMES:
            self.windows.labels(outcome)
        self.latency = Histogram("mmfuse_decision_latency_seconds", "From the window's close (the aligner "
                                 "handing it on) to its decision published", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)

    def count(self, payload: dict) -> None:
        self.windows.labels(wire.decision_outcome(payload)).inc()
        self.latency.observe(payload["latency_ms"] / 1000)

    def read(self) -> list[Metric]:
        return list(self.registry.collect())


class RestoreMetrics:
    """The restorer's: the time each batch of incomplete windows took to restore."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.seconds = Histogram("mmfuse_restore_seconds", "Time to restore one batch of incomplete windows",
                                 buckets=RESTORE_BUCKETS, registry=self.registry)

    def read(self) -> list[Metric]:
        return list(self.registry.collect())


def sensor_families(sensor: str, stats: dict, up: bool) -> list[Metric]:
    """A sensor actor's counts (mmfuse.ingest.SensorIngest.stats and the actor's own) as metric families."""
    messages = CounterMetricFamily("mmfuse_messages", "Sensor messages by result: accepted, or the reason they "
                                   "were rejected", labels=["sensor", "result"])
    messages.add_metric([sensor, "accepted"], stats["accepted"])
    for reason, count in sorted(stats["rejected"].items()):
        messages.add_metric([sensor, reason], count)
    unsupported = sum(stats["unsupported"].values())
    if unsupported:
        messages.add_metric([sensor, "unsupported_encoding"], unsupported)
    gaps = CounterMetricFamily("mmfuse_seq_gap_messages", "Messages missing by their streams' seq: lost before "
                               "they reached the daemon, or at a high-water mark", labels=["sensor"])
    gaps.add_metric([sensor], stats["seq_gaps"])
    refused = CounterMetricFamily("mmfuse_connections_refused", "Peers refused by CURVE authentication",
                                  labels=["sensor"])
    refused.add_metric([sensor], stats.get("auth_refused", 0))
    open_ = GaugeMetricFamily("mmfuse_sensor_up", "1 while the sensor's socket is open and read",
                              labels=["sensor"])
    open_.add_metric([sensor], 1.0 if up else 0.0)
    return [messages, gaps, refused, open_]


def aligner_families(states: dict[str, dict[str, tuple[str, str]]], stats: dict) -> list[Metric]:
    """The aligner's streams by state (mmfuse.aligner.Aligner.stream_states), sessions, late messages and data of
    a stale run."""
    streams = GaugeMetricFamily("mmfuse_streams", "Streams of the open sessions by state", labels=["state"])
    counts = dict.fromkeys(STREAM_STATES, 0)
    for session in states.values():
        for _, state in session.values():
            counts[state] += 1
    for state, count in counts.items():
        streams.add_metric([state], count)
    sessions = GaugeMetricFamily("mmfuse_sessions", "Sessions open in the aligner", value=len(states))
    windows = GaugeMetricFamily("mmfuse_open_windows", "Windows open in the aligner", value=stats["open_windows"])
    late = CounterMetricFamily("mmfuse_late_messages", "Messages that reached the aligner after their window "
                               "closed", value=stats["late"])
    stale = CounterMetricFamily("mmfuse_stale_run_reports", "Stream reports and window contributions dropped for "
                                "another run than their session's (docs/protocol.md, `run`)", value=stats["stale_run"])
    return [streams, sessions, windows, late, stale]
