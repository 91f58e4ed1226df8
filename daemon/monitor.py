"""What the driver knows of the running daemon, for /metrics, /readyz and the live view (mmfuse.daemon.web).

The main loop calls `poll` every supervision round; about once a second it asks the actors that count
metrics for them (one Ray call each; the aligner's answer also carries its streams' states) and the
publisher for the decisions published since the last poll, and takes the answers up in a later round: no call is waited
on, and an actor that does not answer keeps its last reading. A restarted actor counts from zero again;
its previous life's last reading is carried, so the counters served never go back (the aligner takes its
counts up from its snapshot and carries its own). The web thread only reads, under the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mmfuse import __version__, wire

POLL_S = 1.0
ANSWER_WAIT_S = 5.0   # a poll's calls not answered by then are given up, and asked again
VIEW_S = 300.0        # how far back the live view's timelines and plots reach
DECISIONS_SHOWN = 8   # latest decisions per session in the view
SESSIONS_SHOWN = 24   # the sessions heard from most recently; the view counts the others
METERED = ("sensor", "aligner", "restorer", "publisher")  # the stages that count metrics
CARRIED_TYPES = ("counter", "histogram")


class Monitor:
    def __init__(self, bundle_id: str):
        self.bundle_id = bundle_id
        self.started = time.time()
        self.lock = threading.Lock()
        self.supervisor = None
        self.phase = "starting"  # starting, running, draining, stopped
        self.calls: list[tuple[str, str, object]] = []  # (actor, what, call) of the poll in flight
        self.asked_at = 0.0
        self.readings: dict[str, tuple[str, list[Metric]]] = {}  # actor -> (incarnation, its latest metrics)
        self.carried: dict[str, dict[tuple, float]] = {}         # actor -> sample -> sum over its past lives
        self.published: tuple[str, int] = ("", 0)                # (publisher incarnation, decisions read)
        self.sessions: dict[str, SessionView] = {}
        self.failing: dict[str, tuple[float, str]] = {}  # step of the daemon's watch -> (failing since, why)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def attach(self, supervisor) -> None:
        with self.lock:
            self.supervisor, self.phase = supervisor, "running"

    def set_phase(self, phase: str) -> None:
        with self.lock:
            self.phase = phase

    def step_failed(self, step: str, why: str | None) -> None:
        """A step of the daemon's watch failed (why), or went through (None): /readyz names it while it fails."""
        with self.lock:
            if why is None:
                self.failing.pop(step, None)
            elif step not in self.failing:
                self.failing[step] = (time.monotonic(), why)

    def poll(self) -> None:
        """One supervision round's part: take up the answers that came, and ask again about once a second."""
        import ray

        now = time.monotonic()
        if self.calls:
            done, _ = ray.wait([call for _, _, call in self.calls], num_returns=len(self.calls), timeout=0)
            done = set(done)
            answers = []
            for actor, what, call in self.calls:
                if call in done:
                    try:
                        answers.append((actor, what, ray.get(call)))
                    except ray.exceptions.RayError:
                        pass  # it died: the supervisor says so, and its last reading stays
            self.calls = [c for c in self.calls if c[2] not in done]
            self.take(answers)
            if self.calls and now - self.asked_at > ANSWER_WAIT_S:
                self.calls = []
        if not self.calls and now - self.asked_at >= POLL_S:
            self.asked_at = now
            for name, watched in self.supervisor.actors.items():
                if watched.down_since is not None or watched.stage.name not in METERED:
                    continue
                self.calls.append((name, "metrics", watched.handle.read_metrics.remote()))
                if name == "publisher":
                    token, after = self.published
                    self.calls.append((name, "decisions", watched.handle.recent_decisions.remote(after)))

    def take(self, answers: list[tuple[str, str, object]]) -> None:
        now = time.time()
        with self.lock:
            for actor, what, answer in answers:
                if what == "metrics":
                    token, families, *streams = answer  # the aligner's also has its streams' states
                    self._reading(actor, token, families)
                    if streams:
                        self._streams(streams[0], now)
                else:
                    self._decisions(*answer)
            for name in [n for n, s in self.sessions.items() if s.heard_at < now - VIEW_S]:
                del self.sessions[name]

    def _reading(self, actor: str, token: str, families: list[Metric]) -> None:
        previous = self.readings.get(actor)
        if previous is not None and previous[0] != token and actor != "aligner":
            carried = self.carried.setdefault(actor, {})
            for family in previous[1]:
                if family.type in CARRIED_TYPES:
                    for sample in family.samples:
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        carried[key] = carried.get(key, 0.0) + sample.value
        self.readings[actor] = (token, families)

    def _streams(self, states: dict[str, dict[str, tuple[str, str]]], now: float) -> None:
        for name, streams in states.items():
            view = self.sessions.get(name)
            if view is None:
                view = self.sessions[name] = SessionView(name)
            view.track(streams, now)
        for name, view in self.sessions.items():
            if name not in states:
                view.track({source: (modality, "forgotten") for source, (modality, _) in view.states.items()}, now)

    def _decisions(self, token: str, decisions: list[tuple[int, dict]]) -> None:
        after = self.published[1] if token == self.published[0] else 0
        for number, payload in decisions:
            if number <= after:
                continue
            view = self.sessions.get(payload["session"])
            if view is None:
                view = self.sessions[payload["session"]] = SessionView(payload["session"])
            view.decided(payload)
            after = number
        self.published = (token, after)

    def collect(self) -> list[Metric]:
        """The prometheus_client collector: every actor's metrics summed (with their past lives), the driver's."""
        with self.lock:
            families: dict[str, Metric] = {}
            sums: dict[str, dict[tuple, float]] = {}
            for actor, (_, reading) in self.readings.items():
                carried = self.carried.get(actor, {})
                for family in reading:
                    families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                            family.unit))
                    values = sums.setdefault(family.name, {})
                    for sample in family.samples:
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        values[key] = values.get(key, 0.0) + sample.value + carried.get(key, 0.0)
            for name, family in families.items():
                for (sample, labels), value in sums[name].items():
                    family.add_sample(sample, dict(labels), value)
            restarts = CounterMetricFamily("mmfuse_actor_restarts", "Actor processes restarted after they died",
                                           labels=["actor"])
            for name, watched in (self.supervisor.actors if self.supervisor is not None else {}).items():
                restarts.add_metric([name], watched.restarts)
        info = GaugeMetricFamily("mmfuse_build_info", "The daemon's version and bundle", labels=["version", "bundle"])
        info.add_metric([__version__, self.bundle_id], 1.0)
        return [*families.values(), restarts, info]

    def not_ready(self) -> dict[str, str]:
        """What is not ready, by name (empty: ready): the daemon while it starts or drains, a step of its watch that
        keeps failing, actors that are down, sensors whose socket is not open."""
        with self.lock:
            if self.phase != "running":
                return {"daemon": self.phase}
            problems = {f"watch: {step}": f"failing for {time.monotonic() - since:.1f} s: {why}"
                        for step, (since, why) in self.failing.items()}
            for name, watched in self.supervisor.actors.items():
                if watched.down_since is not None:
                    problems[name] = f"down for {time.monotonic() - watched.down_since:.1f} s" + \
                        (f"; {watched.unplaced}" if watched.unplaced else "")
                elif watched.stage.name == "sensor":
                    up = self._sensor_up(name)
                    if up is not True:
                        problems[name] = "socket not open" if up is False else "not reported yet"
            return problems

    def _sensor_up(self, actor: str) -> bool | None:
        """Whether its current life says its socket is open; None until that life has answered."""
        reading = self.readings.get(actor)
        incarnation = self.supervisor.actors[actor].incarnation
        if reading is None or incarnation is None or reading[0] != incarnation.token:
            return None
        gauge = next((f for f in reading[1] if f.name == "mmfuse_sensor_up"), None)
        return None if gauge is None else bool(gauge.samples[0].value)

    def view(self) -> dict:
        """The live view's state: the daemon, and its most recently heard sessions."""
        not_ready = self.not_ready()
        now = time.time()
        with self.lock:
            shown = sorted(self.sessions.values(), key=lambda s: s.heard_at, reverse=True)[:SESSIONS_SHOWN]
            return {"now": now, "version": __version__, "bundle": self.bundle_id, "phase": self.phase,
                    "uptime_s": round(now - self.started, 1), "ready": not not_ready, "not_ready": not_ready,
                    "view_s": VIEW_S, "sessions": [s.as_json(now) for s in sorted(shown, key=lambda s: s.name)],
                    "sessions_hidden": max(0, len(self.sessions) - SESSIONS_SHOWN)}


class SessionView:
    """One session as the live view shows it: each stream's states over time, the latest decisions, and
    per decision whether it was restored and its latency."""

    def __init__(self, name: str):
        self.name = name
        self.states: dict[str, tuple[str, str]] = {}           # source -> (modality, state) now
        self.timelines: dict[str, list[list]] = {}             # source -> [[from, to, state], ...]
        self.latest: deque[dict] = deque(maxlen=DECISIONS_SHOWN)
        self.series: deque[tuple[float, bool, float]] = deque()  # (published at, restored, latency s)
        self.heard_at = time.time()

    def track(self, streams: dict[str, tuple[str, str]], now: float) -> None:
        for source, (modality, state) in streams.items():
            timeline = self.timelines.setdefault(source, [])
            if timeline and timeline[-1][2] == state:
                timeline[-1][1] = now
            else:
                timeline.append([now if not timeline else timeline[-1][1], now, state])
            while timeline and timeline[0][1] < now - VIEW_S:
                timeline.pop(0)
        if any(state != "forgotten" for _, state in streams.values()):
            self.heard_at = now
        self.states = dict(streams)

    def decided(self, payload: dict) -> None:
        self.latest.appendleft({"window": payload["window"]["id"], "revision": payload["window"]["revision"],
                                "label": payload["label"], "scores": payload["scores"],
                                "restored": payload["restored"], "dropped": payload["dropped"],
                                "outcome": wire.decision_outcome(payload), "latency_ms": payload["latency_ms"],
                                "at": payload["published_at"]})
        self.series.append((payload["published_at"], bool(payload["restored"]), payload["latency_ms"] / 1000))
        while self.series and self.series[0][0] < payload["published_at"] - VIEW_S:
            self.series.popleft()
        self.heard_at = max(self.heard_at, payload["published_at"])

    def as_json(self, now: float) -> dict:
        return {"name": self.name,
                "streams": [{"source": source, "modality": modality, "state": state,
                             "timeline": self.timelines.get(source, [])}
                            for source, (modality, state) in sorted(self.states.items())],
                "decisions": list(self.latest),
                "series": [[round(t - now, 2), restored, round(latency, 4)] for t, restored, latency in self.series]}
