"""The Ray runner of mmfuse.pipeline.PIPELINE and its supervisor.

Every stage is one Ray actor (the sensor stage one per configured sensor) created with
`max_restarts=-1`: Ray restarts a dead actor in a new process and the handles, found by
name, stay valid. The supervisor asks every actor for its incarnation every PING_S; a
new one is a restart, and it brings the restarted stage back into the pipeline:

- the aligner is told a sensor died, so its streams count as silent at once (what only
  it held is gone, and the aligner decides those windows with what reached it, the
  sensor in `dropped`); it is started again and re-subscribes;
- the aligner takes up the latest snapshot of its state (the supervisor asks for one
  every PING_S) and the batches the sensors kept since (they keep each until a
  snapshot holding it is confirmed), then hands every unacknowledged window on again;
- while the restorer or fusion is down (its process gone, or silent for SILENT_AFTER_S
  on another node) the other stands in for it, and the aligner hands the windows
  they held on again; once it is back it takes its work up again (with
  pipeline.shared_model_process fusion runs in the restorer's process, and the windows
  wait for its restart);
- a restarted publisher gets every unacknowledged window again.

Copies made on the way are dropped downstream (mmfuse.delivery), so each window is
published once. Nothing here raises because an actor died: every call is awaited with
a time limit and a failure is logged and counted.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from dataclasses import dataclass, field

import psutil

from mmfuse.config import DaemonConfig
from mmfuse.incarnation import Incarnation
from mmfuse.pipeline import PIPELINE, Stage

PING_S = 0.2           # how often each actor is asked for its incarnation, and the aligner for a snapshot
SILENT_AFTER_S = 2.0   # an actor on another node that has not answered for this long counts as down
UNPLACED_AFTER_S = 5.0  # an actor down this long is checked for a node that could hold it
START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 5.0   # stats and recovery calls
DRAIN_TIMEOUT_S = 30.0
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the tracebacks of its errors


@dataclass
class Watched:
    name: str
    stage: Stage
    handle: object
    incarnation: Incarnation | None = None
    ping: object = None                 # the outstanding ping, if any
    answered: float = field(default_factory=time.monotonic)
    down_since: float | None = None
    deaths: int = 0
    restarts: int = 0
    unplaced: str | None = None         # why Ray cannot restart it now: no live node has what it asks for


def placement(section) -> dict:
    """The Ray options that place an actor as its configuration section asks: custom resources, GPUs."""
    return {"num_gpus": getattr(section, "num_gpus", 0.0), "resources": dict(section.resources)}


def stage_actors(config: DaemonConfig) -> list[str]:
    """The actors of the stages after the sensors; fusion has none of its own in a shared model process."""
    shared = config.pipeline.shared_model_process
    return [name for name in ("aligner", "restorer", "fusion", "publisher") if not (shared and name == "fusion")]


def placements(config: DaemonConfig) -> list[tuple[str, str, dict[str, float]]]:
    """(actor, configuration key, what it asks of one node) of every actor that asks for GPUs or resources."""
    asks = [(f"sensor-{s.name}", f"sensors[{i}]", s) for i, s in enumerate(config.sensors)]
    asks += [(name, name, getattr(config, name)) for name in stage_actors(config)]
    found = []
    for actor, key, section in asks:
        options = placement(section)
        ask = options["resources"] | ({"GPU": options["num_gpus"]} if options["num_gpus"] else {})
        if ask:
            found.append((actor, key, ask))
    return found


def placement_problems(config: DaemonConfig, nodes: list[dict], actors: list[str] | None = None) \
        -> list[tuple[str, str]]:
    """(actor, problem) of the actors (default all) no live node of the cluster could hold now (Ray would wait
    for ever to place them), naming the resource no node has enough of and the fix. `nodes`: ray.nodes()."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    problems = []
    for actor, key, ask in placements(config):
        if actors is not None and actor not in actors:
            continue
        if any(all(node.get(name, 0) >= amount for name, amount in ask.items()) for node in alive):
            continue
        short = {name: amount for name, amount in ask.items() if not any(node.get(name, 0) >= amount
                                                                         for node in alive)}
        together, short = not short, short or ask  # each is somewhere, but no node has them all
        custom = {name: amount for name, amount in short.items() if name != "GPU"}
        fixes = ([f"start a node with a GPU, or set {key}.num_gpus: 0"] if "GPU" in short else []) + \
            ([f"start a node that has {' and '.join(custom)} (ray start --address ... --resources "
              f"'{json.dumps(dict.fromkeys(custom, 1))}'), or change {key}.resources"] if custom else [])
        problems.append((actor, f"{actor} cannot be placed: no live node of the Ray cluster has "
                        f"{', '.join(f'{n}: {a:g}' for n, a in short.items())}{' on one node' if together else ''}; "
                        f"{'; or '.join(fixes)}"))
    return problems


def embedded_ray_processes() -> dict[str, psutil.Process]:
    """The GCS and raylet that ray.init started under this process for a Ray of its own: Ray cannot restart an
    actor without either, and its raylet stops, with every actor, a minute after the GCS is lost."""
    return {p.name(): p for p in psutil.Process().children() if p.name() in ("gcs_server", "raylet")}


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Supervisor:
    def __init__(self, config: DaemonConfig, bundle, log_format: dict, virtual_clock: bool, log):
        import ray

        self.config = config.resolved()
        self.log = log
        self.node = ray.get_runtime_context().get_node_id()
        self.actors: dict[str, Watched] = {}
        for stage in PIPELINE:
            cls = getattr(importlib.import_module(stage.actor.split(":")[0]), stage.actor.split(":")[1])
            for name, args, options in self._instances(stage, bundle, log_format, virtual_clock):
                handle = ray.remote(cls).options(name=name, max_restarts=-1, max_task_retries=0, num_cpus=0,
                                                 **options).remote(*args)
                self.actors[name] = Watched(name, stage, handle)
        self.sensors = [w for w in self.actors.values() if w.stage.name == "sensor"]
        self.aligner = self.actors["aligner"]
        self.snapshot: dict | None = None
        self.snapshot_call = None
        self.unacknowledged = 0
        self.fresh = False  # a snapshot was read since the aligner last died or was told to drain
        self.pending: list[tuple[str, str, object]] = []  # (actor, what, call) to check later
        self.restoring = False
        self.output_address = self.config.output.endpoint
        self.placed_checked = 0.0  # when the placement of actors long down was last checked
        self.lost: str | None = None  # why the actors can never come back: the daemon gives up
        self.ray_processes = {} if config.ray.address else embedded_ray_processes()

    def _instances(self, stage: Stage, bundle, log_format: dict, virtual_clock: bool):
        """(actor name, constructor arguments, Ray options) of each actor of a stage."""
        config = self.config
        one_at_a_time = {"max_concurrency": 1}  # calls from one caller run in order; one thread owns each socket
        if stage.name == "sensor":  # two at a time: it answers pings and hands its kept batches over while stop() waits
            return [(f"sensor-{s.name}", (config, s.name, bundle.modalities[s.modality]["dim"], log_format,
                                          virtual_clock), {"max_concurrency": 2} | placement(s))
                    for s in config.sensors]
        if stage.name == "aligner":
            return [("aligner", (config, sorted(bundle.modalities), log_format, virtual_clock),
                     one_at_a_time | placement(config.aligner))]
        if stage.name == "publisher":
            return [("publisher", (config, log_format), one_at_a_time | placement(config.publisher))]
        if stage.name not in stage_actors(config):
            return []
        return [(stage.name, (config, log_format), placement(getattr(config, stage.name)))]

    def start(self) -> list[str]:
        """Wait until every actor is up, restore the aligner (empty), then open the sensor sockets; returns the
        problems found."""
        import ray

        try:
            incarnations = ray.get([w.handle.ping.remote() for w in self.actors.values() if w not in self.sensors],
                                   timeout=START_TIMEOUT_S)
            problems = [ray.get(self.actors["publisher"].handle.ready.remote(), timeout=START_TIMEOUT_S)]
            self.output_address = ray.get(self.actors["publisher"].handle.address.remote(), timeout=START_TIMEOUT_S)
            ray.get(self.aligner.handle.restore.remote(None, {}, frozenset()), timeout=START_TIMEOUT_S)
            ray.get([self.actors[name].handle.connect.remote() for name in stage_actors(self.config)],
                    timeout=START_TIMEOUT_S)
            for watched, incarnation in zip([w for w in self.actors.values() if w not in self.sensors], incarnations):
                watched.incarnation = incarnation
            problems = [p for p in problems if p]
            if not problems:
                problems = [p for p in ray.get([w.handle.start.remote() for w in self.sensors],
                                               timeout=START_TIMEOUT_S) if p]
                for watched, incarnation in zip(self.sensors, ray.get([w.handle.ping.remote() for w in self.sensors],
                                                                      timeout=START_TIMEOUT_S)):
                    watched.incarnation = incarnation
        except ray.exceptions.GetTimeoutError:
            return [f"actors not up within {START_TIMEOUT_S:g} s"]
        except ray.exceptions.RayError as exc:
            return [f"an actor failed to start: {ANSI_CODES.sub('', str(exc))}"]
        return problems

    def pids(self) -> dict[str, int]:
        return {name: w.incarnation.pid for name, w in self.actors.items() if w.incarnation is not None}

    def down(self) -> frozenset[str]:
        """The model stages that are down (the others have nothing to stand in for them)."""
        return frozenset(w.name for w in self.actors.values() if w.down_since is not None and w.stage.model)

    def watch(self) -> None:
        """One round: ping every actor, notice deaths and restarts, keep the aligner's snapshot fresh."""
        import ray

        now = time.monotonic()
        dead = [f"{name} (pid {p.pid})" for name, p in self.ray_processes.items() if not _running(p)]
        if dead and self.lost is None:
            self.lost = f"the embedded Ray's {' and '.join(dead)} died: no actor can be restarted without it"
        for watched in self.actors.values():
            if watched.ping is None:
                watched.ping = watched.handle.ping.remote()
        calls = [w.ping for w in self.actors.values()]
        answered, _ = ray.wait(calls, num_returns=len(calls), timeout=0.05)
        answered = set(answered)
        for watched in self.actors.values():
            if watched.ping in answered:
                call, watched.ping = watched.ping, None
                try:
                    incarnation = ray.get(call)
                except ray.exceptions.RayError:
                    self._died(watched, "its calls fail")
                    continue
                watched.answered = now
                if watched.incarnation is not None and incarnation.token != watched.incarnation.token:
                    # Ray can restart a killed actor between two pings: a new life means the old one died
                    self._died(watched, "a new incarnation answered")
                    watched.incarnation = incarnation
                    self._restarted(watched)
                elif watched.down_since is not None:  # it was only slow: the same life answers again
                    self._back(watched)
                watched.incarnation = incarnation
            elif self._gone(watched, now):
                self._died(watched, "its process is gone" if self._local(watched) else
                           f"silent for {now - watched.answered:.1f} s")
        self._keep_snapshot()
        self._check_pending()
        self._check_placement(now)

    def _check_placement(self, now: float) -> None:
        """Actors down for UNPLACED_AFTER_S whose node is gone, and no other live node has what they ask for: Ray
        restarts them once a node that has it joins. Said once per life lost."""
        import ray

        down = [w for w in self.actors.values() if w.down_since is not None and now - w.down_since > UNPLACED_AFTER_S]
        if not down or now - self.placed_checked < UNPLACED_AFTER_S:
            return
        self.placed_checked = now
        nodes = ray.nodes()
        if not any(node["Alive"] and node["NodeID"] == self.node for node in nodes):
            self.lost = (f"the daemon's own Ray node {self.node[:12]} is not alive (its raylet died): "
                         f"{', '.join(w.name for w in down)} cannot be restarted")
            return
        problems = dict(placement_problems(self.config, nodes, [w.name for w in down]))
        for watched in down:
            problem = problems.get(watched.name)
            if problem and problem != watched.unplaced:
                self.log.error("actor cannot be placed", actor=watched.name, problem=problem)
            watched.unplaced = problem

    @property
    def can_drain(self) -> bool:
        """Whether the actors can still close the open windows, although Ray is lost (only its GCS died)."""
        return "raylet" in self.ray_processes and _running(self.ray_processes["raylet"])

    def _local(self, watched: Watched) -> bool:
        return watched.incarnation is not None and watched.incarnation.node == self.node

    def _gone(self, watched: Watched, now: float) -> bool:
        if watched.down_since is not None or watched.incarnation is None:
            return False
        if self._local(watched):
            try:
                return psutil.Process(watched.incarnation.pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        return now - watched.answered > SILENT_AFTER_S

    def _died(self, watched: Watched, why: str) -> None:
        if watched.down_since is not None:
            return
        watched.down_since = time.monotonic()
        watched.deaths += 1
        self.log.warning("actor died", actor=watched.name, why=why,
                         pid=watched.incarnation.pid if watched.incarnation else None, deaths=watched.deaths)
        if watched.stage.model:
            self._tell_aligner("set_down", self.down())
        if watched.stage.name == "sensor" and watched.incarnation is not None:  # told before its next life starts
            self._tell_aligner("sensor_lost", watched.name.removeprefix("sensor-"), watched.incarnation.token)
        if watched is self.aligner:
            self.snapshot_call = None
            self.fresh = False

    def _back(self, watched: Watched) -> None:
        watched.down_since, watched.unplaced = None, None
        self.log.info("actor answers again", actor=watched.name, pid=watched.incarnation.pid)
        if watched.stage.model:
            self._tell_aligner("set_down", self.down())
        if watched.stage.name == "sensor":
            self._tell_aligner("sensor_lost", watched.name.removeprefix("sensor-"), watched.incarnation.token, False)

    def _restarted(self, watched: Watched) -> None:
        import ray

        since = watched.down_since if watched.down_since is not None else watched.answered
        watched.down_since, watched.unplaced = None, None
        watched.restarts += 1
        self.log.info("actor restarted", actor=watched.name, took_s=round(time.monotonic() - since, 3),
                      pid=watched.incarnation.pid, restarts=watched.restarts)
        if watched.stage.name == "sensor":
            self.pending.append((watched.name, "start", watched.handle.start.remote()))
            return
        self.pending.append((watched.name, "connect", watched.handle.connect.remote()))
        if watched is self.aligner:
            kept = {}
            calls = {w.name: w.handle.retained_batches.remote() for w in self.sensors if w.down_since is None}
            for name, call in calls.items():
                try:
                    kept[name] = ray.get(call, timeout=CALL_TIMEOUT_S)
                except ray.exceptions.RayError as exc:
                    self.log.warning("a sensor's retained batches could not be had", sensor=name, error=repr(exc))
            self.snapshot_call = None
            self.pending.append(("aligner", "restore", self.aligner.handle.restore.remote(
                self.snapshot, kept, self.down())))
        elif watched.stage.model:
            self._tell_aligner("set_down", self.down())
        else:
            self.pending.append((watched.name, "ready", watched.handle.ready.remote()))
            self._tell_aligner("redeliver")

    def _tell_aligner(self, method: str, *args) -> None:
        self.pending.append(("aligner", method, getattr(self.aligner.handle, method).remote(*args)))

    def _keep_snapshot(self) -> None:
        """Ask the aligner for its state; once it comes, the sensors may forget the batches it holds."""
        import ray

        if self.aligner.down_since is not None:
            return
        if self.snapshot_call is None:
            self.snapshot_call = (self.aligner.incarnation, self.aligner.handle.snapshot.remote())
            return
        incarnation, call = self.snapshot_call
        if not ray.wait([call], timeout=0)[0]:
            return
        self.snapshot_call = None
        try:
            state = ray.get(call)
        except ray.exceptions.RayError:
            return
        if state is None or incarnation != self.aligner.incarnation:
            return  # not restored yet, or from a life of the aligner that has ended
        self.snapshot, applied, self.unacknowledged = state
        self.fresh = True
        for sensor in self.sensors:
            key = (sensor.name.removeprefix("sensor-"), sensor.incarnation.token if sensor.incarnation else None)
            if key in applied and sensor.down_since is None:
                sensor.handle.confirm.remote(key[1], applied[key])

    def _check_pending(self) -> None:
        import ray

        still = []
        for actor, what, call in self.pending:
            if not ray.wait([call], timeout=0)[0]:
                still.append((actor, what, call))
                continue
            try:
                result = ray.get(call)
            except ray.exceptions.RayError as exc:
                self.log.warning("recovery call failed", actor=actor, call=what, error=type(exc).__name__)
                continue
            if what in ("start", "ready") and result:
                self.log.error("a restarted actor could not open its socket", actor=actor, problem=result)
            elif what == "restore":
                self.log.info("aligner restored", **result)
        self.pending = still

    def stats(self) -> dict:
        """Every actor's stats, as far as they answer within CALL_TIMEOUT_S, and the supervision counts."""
        import ray

        calls = {name: w.handle.stats.remote() for name, w in self.actors.items() if w.down_since is None}
        done, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=CALL_TIMEOUT_S)
        stats = {}
        for name, call in calls.items():
            try:
                stats[name] = ray.get(call) if call in done else "no answer"
            except ray.exceptions.RayError:
                stats[name] = "unavailable"
        stats["supervision"] = {name: {"deaths": w.deaths, "restarts": w.restarts}
                                for name, w in self.actors.items() if w.deaths or w.restarts}
        return stats

    def drain(self) -> dict:
        """Stop reading sensors, close every open window, and wait until every decision is out, watching on: an
        actor that dies meanwhile is brought back as at any other time."""
        import ray

        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        stops = [w.handle.stop.remote() for w in self.sensors if w.down_since is None]  # a lost one never answers
        while ray.wait(stops, num_returns=len(stops), timeout=0)[1] and time.monotonic() < deadline:
            self.watch()
            time.sleep(PING_S)
        drained = None  # the aligner incarnation told to drain
        while time.monotonic() < deadline:
            self.watch()
            aligner = self.aligner
            if aligner.down_since is None and drained != aligner.incarnation.token and not self.pending:
                ray.wait([aligner.handle.drain.remote()], timeout=CALL_TIMEOUT_S)
                drained = aligner.incarnation.token
                self.snapshot_call, self.fresh = None, False  # the next snapshot read comes after the drain
            elif (aligner.down_since is None and drained == aligner.incarnation.token and self.fresh
                  and not self.unacknowledged):
                break
            time.sleep(PING_S)
        if self.unacknowledged:
            self.log.error("windows not published when the drain timed out", count=self.unacknowledged)
        for name in [n for n in ("restorer", "fusion", "publisher") if n in self.actors]:
            try:
                ray.get(self.actors[name].handle.drain.remote(), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayError as exc:
                self.log.warning("drain call failed", actor=name, error=type(exc).__name__)
        return self.stats()
