"""Aligner actor: sensor batches arrive as calls, a ticker closes windows on deadlines, and
closed windows are handed on along PIPELINE.route. Every window handed on stays in the
Outbox until the publisher acknowledges it; the supervisor keeps a snapshot of the whole
state, from which a restarted aligner carries on."""

from __future__ import annotations

import heapq
import threading
import time

import structlog

from mmfuse.config import DaemonConfig
from mmfuse.delivery import Outbox
from mmfuse.frames import ClosedWindow, SensorBatch, WindowKey
from mmfuse.incarnation import Incarnation
from mmfuse.logs import configure
from mmfuse.metrics import aligner_families
from mmfuse.pipeline import PIPELINE, build_aligner
from mmfuse.stages import StageHandles
from mmfuse.virtual_clock import TICK_S, AlignerTicks, Tick

IN_FLIGHT_KEPT = 64


class AlignerActor:
    """Starts empty and waits for `restore` (the supervisor's snapshot, if any, and the batches the sensors kept
    since); calls that come before it are held and applied after. On a virtual clock (mmfuse.virtual_clock)
    there is no ticker: the sensors' reports carry the time."""

    def __init__(self, config: DaemonConfig, modalities: list[str], log_format: dict, virtual_clock: bool = False):
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="aligner")
        self.incarnation = Incarnation.here()
        self.aligner = build_aligner(config, modalities, self.log)
        sensors = [s.name for s in config.sensors]
        self.ticks = AlignerTicks(self.aligner, sensors) if virtual_clock else None
        self.outbox = Outbox()
        self.applied: dict[tuple[str, str], int] = {}  # (sensor, incarnation) -> number of its last batch applied
        self.down: frozenset[str] = frozenset()        # stages the supervisor reports down
        self.fusion_in_restorer = config.pipeline.shared_model_process
        self.stages = StageHandles()
        self.lock = threading.RLock()  # restore() replays held calls, which take it too
        self.restored = False
        self.held: list[tuple[str, tuple]] = []        # calls that came before restore()
        self.in_flight: list = []
        self.calls = self.replays = self.redelivered = self.skipped = 0
        self.stopping = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="aligner-ticker", daemon=True)
        if not virtual_clock:
            self.ticker.start()

    def ping(self) -> Incarnation:
        return self.incarnation

    def restore(self, snapshot: dict | None, retained: dict[str, list[SensorBatch]], down: frozenset[str]) -> dict:
        """Take up the state of `snapshot` (None: a first start), apply the batches sensors sent since, then what
        was held, and hand every unacknowledged window on again."""
        with self.lock:
            if snapshot is not None:
                self.aligner, self.outbox, self.applied = snapshot["aligner"], snapshot["outbox"], snapshot["applied"]
                self.aligner.log = self.log
                if self.ticks is not None:
                    self.ticks = snapshot["ticks"]
            self.down = down
            replayed = 0
            in_order = [sorted(batches, key=lambda b: b.number) for batches in retained.values()]  # (see _apply)
            for batch in heapq.merge(*in_order, key=lambda b: b.as_of):
                replayed += self._apply(batch)  # in the order they were made, as the first life saw them
            self.restored = True
            held, self.held = self.held, []
            for method, args in held:
                getattr(self, method)(*args)
            if snapshot is not None:
                self._redeliver()
                self._dispatch(self.aligner.poll(time.time()))
            return {"replayed_batches": replayed, "held_calls": len(held), "unacknowledged": len(self.outbox)}

    def snapshot(self) -> tuple[dict, dict[tuple[str, str], int], int] | None:
        """(a copy of the state, the last batch it holds per sensor incarnation, windows not acknowledged yet);
        None before restore(). Copied under the lock: Ray serialises the answer after the call, while the ticker
        may be closing windows."""
        with self.lock:
            if not self.restored:
                return None
            aligner = self.aligner.copy()
            ticks = self.ticks.copy(aligner) if self.ticks is not None else None
            state = {"aligner": aligner, "outbox": self.outbox.copy(), "applied": dict(self.applied), "ticks": ticks}
            return state, dict(self.applied), len(self.outbox)

    def push(self, batch: SensorBatch) -> None:
        with self.lock:
            if not self.restored:
                self.held.append(("push", (batch,)))
                return
            if self._apply(batch):
                self._dispatch(self.aligner.poll(time.time()))

    def _apply(self, batch: SensorBatch) -> bool:
        """Apply a sensor batch once: a batch at or below the last one applied from that sensor's incarnation is
        a copy (re-sent after a restart) and skipped."""
        key = (batch.sensor, batch.incarnation)
        if batch.number <= self.applied.get(key, -1):
            self.skipped += 1
            return False
        self.applied[key] = batch.number
        self.aligner.push(batch)
        return True

    def connect(self) -> None:
        """Connect to the stages windows go to, before the first window does (mmfuse.stages)."""
        with self.lock:
            self.in_flight += self.stages.connect(["restorer"] if self.fusion_in_restorer else ["restorer", "fusion"])

    def ack(self, keys: list[WindowKey]) -> None:
        """The publisher has sent these windows' decisions."""
        with self.lock:
            if not self.restored:
                self.held.append(("ack", (keys,)))
                return
            self.outbox.ack(keys)

    def set_down(self, down: frozenset[str]) -> None:
        """The stages now down; windows go to those standing in for them, and every unacknowledged one again."""
        with self.lock:
            standing_in = self._decider() == "restorer"
            self.down = down
            if standing_in and self._decider() == "fusion":
                self._call("restorer", "stand_down")
            if self.restored:
                self._redeliver()

    def sensor_lost(self, sensor: str, incarnation: str, lost: bool = True) -> None:
        """That life of a sensor actor died, or (`lost` False) was taken for dead and answers again
        (mmfuse.aligner.Aligner.lose_sensor, regain_sensor)."""
        with self.lock:
            if not self.restored:
                self.held.append(("sensor_lost", (sensor, incarnation, lost)))
            elif lost:
                self.aligner.lose_sensor(sensor, incarnation)
                self._dispatch(self.aligner.poll(time.time()))
            else:
                self.aligner.regain_sensor(sensor, incarnation)

    def redeliver(self) -> None:
        """Hand every unacknowledged window on again (the publisher restarted and lost what it held)."""
        with self.lock:
            if self.restored:
                self._redeliver()

    def report(self, sensor: str, tick: Tick, batch: SensorBatch | None, replay: int) -> None:
        """A sensor's report on the virtual clock."""
        with self.lock:
            if not self.restored:
                self.held.append(("report", (sensor, tick, batch, replay)))
                return
            windows, over = self.ticks.report(sensor, tick, batch, replay)
            self._dispatch(windows)
            if over:
                self.replays += 1
                self.log.info("replay over", at=tick.now, **self.aligner.stats())

    def _tick(self) -> None:
        while not self.stopping.wait(TICK_S):
            with self.lock:
                if self.restored:
                    self._dispatch(self.aligner.poll(time.time(), due_only=True))

    def _dispatch(self, windows: list[ClosedWindow]) -> None:
        now = time.time()
        for window in windows:
            window.dispatched_at = now
        self.outbox.add(windows)
        self._hand_on(windows)
        ends = self.aligner.take_finished()
        if ends:  # after the sessions' windows: fusion forgets a session once it has decided them all
            self.outbox.add_ends(ends)
            self._call(self._decider(), "finish", ends)

    def _decider(self) -> str:
        """The stage that decides: fusion, or the restorer standing in for it (always, when fusion runs in it)."""
        if self.fusion_in_restorer:
            return "restorer"
        return "restorer" if "fusion" in self.down and "restorer" not in self.down else "fusion"

    def _hand_on(self, windows: list[ClosedWindow]) -> None:
        decider = self._decider()
        routed: dict[str, list[ClosedWindow]] = {}
        for window in windows:
            stage = "restorer" if self.fusion_in_restorer else PIPELINE.route(window, self.down)
            routed.setdefault(stage, []).append(window)
        for stage, group in routed.items():
            if stage == "restorer":
                self._call("restorer", "restore", group, decider == "restorer")
            else:
                self._call("fusion", "decide", group)

    def _redeliver(self) -> None:
        closed = {(name, s.epoch): s.closed for name, s in self.aligner.sessions.items()}
        floors = self.outbox.floors(closed)
        self._call(self._decider(), "resume", floors)
        self._call("publisher", "resume", floors)
        pending = self.outbox.pending()
        self.redelivered += len(pending)
        if pending:
            self.log.info("windows handed on again", count=len(pending), down=sorted(self.down))
            self._hand_on(pending)
        if self.outbox.ends:
            self._call(self._decider(), "finish", list(self.outbox.ends.values()))

    def _call(self, stage: str, method: str, *args) -> None:
        import ray

        self.in_flight.append(getattr(self.stages[stage], method).remote(*args))
        self.calls += 1
        if len(self.in_flight) > IN_FLIGHT_KEPT:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        """Close every open window and hand it on; the supervisor then waits for the outbox to empty."""
        self.stopping.set()
        if self.ticker.is_alive():
            self.ticker.join()
        with self.lock:
            if self.restored:
                self._dispatch(self.aligner.drain(time.time()))
        return self.stats()

    def read_metrics(self) -> tuple[str, list, dict[str, dict[str, tuple[str, str]]]]:
        """Its metrics, and the streams' states they count (mmfuse.aligner.Aligner.stream_states) for the live
        view: worked out once, under the lock the batches wait for."""
        with self.lock:
            states = self.aligner.stream_states()
            return self.incarnation.token, aligner_families(states, self.aligner.stats()), states

    def stats(self) -> dict:
        with self.lock:
            return {**self.aligner.stats(), "calls_out": self.calls, "unacknowledged": len(self.outbox),
                    "redelivered": self.redelivered, "copies_skipped": self.skipped,
                    **({"replays": self.replays} if self.ticks is not None else {})}
