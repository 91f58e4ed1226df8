"""Restorer actor: restore() only queues; a worker thread restores up to max_batch windows at
a time across sessions, waiting at most max_wait_ms for a batch to fill, and hands them to
fusion. While fusion is down it stands in for it: it decides the windows itself and
publishes them. With pipeline.shared_model_process it always does, and there is no fusion actor."""

from __future__ import annotations

import threading
import time

import structlog

from mmfuse.config import DaemonConfig
from mmfuse.frames import ClosedWindow, SessionEnd
from mmfuse.incarnation import Incarnation
from mmfuse.logs import configure
from mmfuse.metrics import RestoreMetrics
from mmfuse.pipeline import build_fusion, build_restorer
from mmfuse.stages import StageHandles

IN_FLIGHT_KEPT = 64


class RestorerActor:
    def __init__(self, config: DaemonConfig, log_format: dict):
        from mmfuse.bundle import load_bundle
        from mmfuse.inference import actor_device, limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="restorer")
        self.incarnation = Incarnation.here()
        self.config = config
        self.bundle = load_bundle(config.bundle)
        self.device = actor_device(config.restorer.num_gpus)
        self.restorer = build_restorer(config, self.bundle, self.device)
        self.fusion = None  # a FusionHead while standing in for the fusion stage, or always in a shared process
        if config.pipeline.shared_model_process:
            self.fusion = build_fusion(config, self.bundle, self.restorer, self.device)
            self.fusion.warm_up()
        self.max_batch, self.max_wait = config.restorer.max_batch, config.restorer.max_wait_ms / 1000
        self.queue: list[tuple[float, ClosedWindow, bool]] = []
        self.condition = threading.Condition()
        self.busy = False
        self.stopping = False
        self.in_flight: list = []
        self.stages = StageHandles()
        self.shared = config.pipeline.shared_model_process
        self.windows = self.batches = self.failed = self.decided = 0
        self.metrics = RestoreMetrics()
        threading.Thread(target=self._work, name="restorer", daemon=True).start()
        self.log.info("restorer ready", method=config.restorer.method, bundle=self.bundle.id, device=self.device,
                      incarnation=self.incarnation.token)

    def ping(self) -> Incarnation:
        return self.incarnation

    def connect(self) -> None:
        """Connect to the stages it hands windows and decisions to (mmfuse.stages)."""
        with self.condition:
            self.in_flight += self.stages.connect(["publisher"] if self.shared else ["fusion", "publisher"])

    def restore(self, windows: list[ClosedWindow], decide: bool = False) -> None:
        """Queue windows; with `decide`, decide them here too (fusion is down)."""
        with self.condition:
            now = time.monotonic()
            self.queue.extend((now, w, decide) for w in windows)
            self.condition.notify()

    def resume(self, floors: dict[tuple[str, int], int]) -> None:
        """Decide from these floors of each session's close order on (FusionHead.resume): as fusion's stand-in
        from now, or as before (the publisher restarted). A head kept keeps the sessions' order: a fresh one would
        wait for windows above a floor that were published already."""
        with self.condition:
            if self.fusion is None:
                self.fusion = build_fusion(self.config, self.bundle, self.restorer, self.device)
            self._publish(self.fusion.resume(floors))

    def stand_down(self) -> None:
        """Fusion is back: hand windows on to it again, those queued to be decided here too."""
        with self.condition:
            self.fusion = None

    def finish(self, ends: list[SessionEnd]) -> None:
        with self.condition:
            if self.fusion is not None:
                self.fusion.finish(ends)

    def _work(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.stopping:
                    self.condition.wait()
                if not self.queue:
                    return
                deadline = self.queue[0][0] + self.max_wait
                while len(self.queue) < self.max_batch and not self.stopping and time.monotonic() < deadline:
                    self.condition.wait(deadline - time.monotonic())
                batch = self.queue[:self.max_batch]
                del self.queue[:self.max_batch]
                self.busy = True
            windows = self._restored([w for _, w, _ in batch])
            with self.condition:
                decide = [w for w, (_, _, here) in zip(windows, batch) if here]
                if decide and self.fusion is not None:
                    self.decided += len(decide)
                    self._publish(self.fusion.decide(decide))
                onward = [w for w, (_, _, here) in zip(windows, batch) if not here or self.fusion is None]
                if onward:
                    self._call("fusion", "decide", onward)
                self.windows += len(windows)
                self.batches += 1
                self.busy = False
                self.condition.notify_all()

    def _restored(self, windows: list[ClosedWindow]) -> list[ClosedWindow]:
        incomplete = [w for w in windows if not w.complete]
        if not incomplete:
            return windows
        try:
            with self.metrics.seconds.time():
                self.restorer.restore(incomplete)
        except Exception as exc:  # a lost window would hold back its session's decisions for good
            self.log.exception("restoration failed; the windows are decided zero-filled", windows=len(incomplete),
                               error=repr(exc))
            self.restorer.zero_filled(incomplete)
            self.failed += len(incomplete)
        return windows

    def _publish(self, decisions) -> None:
        if decisions:
            self._call("publisher", "publish", decisions)

    def _call(self, stage: str, method: str, *args) -> None:
        import ray

        self.in_flight.append(getattr(self.stages[stage], method).remote(*args))
        if len(self.in_flight) > IN_FLIGHT_KEPT:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)

    def drain(self) -> dict:
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
            while self.queue or self.busy:
                self.condition.wait()
        return self.stats()

    def read_metrics(self) -> tuple[str, list]:
        return self.incarnation.token, self.metrics.read()

    def stats(self) -> dict:
        return {"windows": self.windows, "batches": self.batches, "failed": self.failed,
                "decided_standing_in": self.decided, "method": self.config.restorer.method}
