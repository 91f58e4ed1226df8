"""Publisher actor: binds the output socket, publishes each window's decision once on
`decision/<session>`, each session's in close order, and acknowledges it to the aligner,
which then forgets the window."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque

import structlog
import zmq

from mmfuse import wire
from mmfuse.config import DaemonConfig
from mmfuse.delivery import CloseOrder, Published
from mmfuse.incarnation import Incarnation
from mmfuse.logs import configure
from mmfuse.metrics import DecisionMetrics
from mmfuse.security import CONSUMERS, Gatekeeper, daemon_keys, serve
from mmfuse.stages import StageHandles

RECONNECT_WAIT_S = 1.0  # how long a new publisher waits for a first subscriber before it publishes
RECENT_KEPT = 1024      # decisions kept for the live view (mmfuse.daemon.monitor reads them about once a second)


class PublisherActor:
    """An XPUB socket, so the publisher sees subscribers arrive: a restarted publisher's consumers reconnect
    within ZeroMQ's reconnect interval, and decisions sent before that would be lost to them."""

    def __init__(self, config: DaemonConfig, log_format: dict):
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="publisher")
        self.incarnation = Incarnation.here()
        self.endpoint = config.output.endpoint
        context = zmq.Context.instance()
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.error: str | None = None
        self.closed = False  # drained: the socket is closed
        self.gate = None
        keys = daemon_keys(config)
        if keys is not None:
            self.gate = Gatekeeper(context, self.log)
            self.gate.start()
            self.gate.admit(CONSUMERS, keys.consumers)
            serve(self.socket, keys.certificate, CONSUMERS)
            self.gate.watch(self.socket, CONSUMERS)
        try:
            self.socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self.error = f"output: cannot bind {self.endpoint}: {exc}"
        self.bound_at = time.monotonic()
        self.subscribed = False
        self.sent = Published()
        self.order = CloseOrder(waiting_for_floors=_restarted())
        self.lock = threading.Lock()  # the socket and the order, between calls and the gap timer
        threading.Thread(target=self._watch_gaps, name="publisher-gaps", daemon=True).start()
        self.published = 0
        self.metrics = DecisionMetrics()
        self.recent: deque[tuple[int, dict]] = deque(maxlen=RECENT_KEPT)  # (number published, wire payload)
        self.stages = StageHandles()

    def ping(self) -> Incarnation:
        return self.incarnation

    def connect(self) -> None:
        """Connect to the aligner before the first acknowledgement goes to it (mmfuse.stages)."""
        self.stages.connect(["aligner"])

    def ready(self) -> str | None:
        return self.error

    def address(self) -> str:
        """Where consumers connect, from any machine: the output endpoint, a wildcard host made this node's."""
        import ray

        return wire.connect_address(self.endpoint, ray.util.get_node_ip_address())

    def _read_subscriptions(self, wait_s: float = 0.0) -> None:
        while self.socket.poll(wait_s * 1000, zmq.POLLIN):
            self.subscribed |= self.socket.recv()[:1] == b"\x01"
            wait_s = 0.0

    def publish(self, decisions: list[wire.Decision]) -> None:
        """Send each decision not sent before, in its session's close order (mmfuse.delivery.CloseOrder: one
        that comes before an earlier window of its session waits for it), then acknowledge those sent and the
        copies (their first acknowledgement may have been lost with an aligner). Without a socket nothing is
        acknowledged, so the aligner keeps the windows."""
        with self.lock:
            if not self.error and not self.closed:
                self._send(*self.order.take(decisions, time.monotonic()))

    def resume(self, floors: dict[tuple[str, int], int]) -> None:
        """The aligner's floors: where each session's close order stands (a publisher that took over from a dead
        one holds every decision until it has them)."""
        with self.lock:
            self.order.resume(floors)
            if not self.error and not self.closed:
                self._send(*self.order.take([], time.monotonic()))

    def _watch_gaps(self) -> None:
        while True:
            time.sleep(1.0)
            with self.lock:
                if self.order.held and not self.error and not self.closed:
                    self._send(*self.order.take([], time.monotonic()))

    def _send(self, decisions: list[wire.Decision], copies: list[wire.Decision]) -> None:
        if not decisions and not copies:
            return
        self._read_subscriptions()
        wait = RECONNECT_WAIT_S - (time.monotonic() - self.bound_at)
        if not self.subscribed and wait > 0:
            self._read_subscriptions(wait)
        now = time.time()
        for decision in decisions:
            if not self.sent.first_time(decision.key, time.monotonic()):
                continue
            decision = dataclasses.replace(decision, latency_ms=round((now - decision.dispatched_at) * 1000, 3))
            payload = wire.decision_payload(decision)
            self.socket.send_multipart(wire.encode_decision(decision, payload))
            self.published += 1
            self.metrics.count(payload)
            self.recent.append((self.published, payload | {"published_at": now}))
            self.log.debug("decision", session=decision.session, window=decision.window_id,
                           label=decision.label, restored=decision.restored, dropped=decision.dropped)
        self.stages["aligner"].ack.remote([d.key for d in decisions + copies])

    def drain(self) -> dict:
        with self.lock:
            self.closed = True
            self.socket.close()  # LINGER lets queued decisions go out first
        return self.stats()

    def read_metrics(self) -> tuple[str, list]:
        return self.incarnation.token, self.metrics.read()

    def recent_decisions(self, after: int) -> tuple[str, list[tuple[int, dict]]]:
        """The decisions published after the `after`-th one of this incarnation, as far as they are kept."""
        return self.incarnation.token, [(n, payload) for n, payload in self.recent if n > after]

    def stats(self) -> dict:
        refused = {} if self.gate is None else {"auth_refused": self.gate.refused_count}
        return {"published": self.published, "duplicates_dropped": self.sent.duplicates + self.order.copies,
                "held_for_order": self.order.held_count(), "order_gaps_given_up": self.order.gaps_given_up,
                **refused}


def _restarted() -> bool:
    """Whether Ray restarted this actor (a publisher that takes over from a dead one)."""
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)
