"""Sensor actor: owns one sensor's SUB socket, reads it in its own thread, and hands the
aligner SensorIngest's batches, never per frame. It keeps every batch it sent until the
supervisor confirms the aligner's snapshot holds it, so a restarted aligner loses nothing.
With `recorder` configured it also pushes every message it accepted to mmfuse-record."""

from __future__ import annotations

import threading
import time

import structlog

from mmfuse import wire
from mmfuse.config import DaemonConfig
from mmfuse.frames import SensorBatch
from mmfuse.incarnation import Incarnation
from mmfuse.logs import Tally, configure
from mmfuse.metrics import sensor_families
from mmfuse.pipeline import build_ingest
from mmfuse.virtual_clock import TICK_TOPIC, SensorTicks, parse_tick

RECORDER_WAIT_S = 2.0  # for a listening mmfuse-record to complete its handshake
STOP_HANDLING_S = 10.0  # at stop, messages still queued are handled this long, then counted unread
READ_MAX = 500  # messages read and handled under one hold of the lock (about 30 ms of work on a slow machine)
READS_PER_WAKE = 20  # reads before the loop forwards to the recorder and looks at stopping again
RETAINED_MAX = 5000  # batches kept for a restarted aligner: minutes of them, if snapshots stop coming


class SensorActor:
    """A batch goes out as soon as a stream has passed a window end (at most one per batch interval),
    otherwise after the flush interval, so Ray calls follow windows, not frames. On a virtual clock
    (mmfuse.virtual_clock) the same rule runs on the replay's ticks, and every message carries its
    recorded receive time."""

    MAX_IN_FLIGHT = 4

    def __init__(self, config: DaemonConfig, name: str, dim: int | None, log_format: dict,
                 virtual_clock: bool = False):
        configure(**log_format)
        self.sensor = next(s for s in config.sensors if s.name == name)
        self.min_interval = config.pipeline.batch_interval_ms / 1000.0
        self.flush_interval = config.pipeline.flush_interval_ms / 1000.0
        self.gather = config.pipeline.gather_ms / 1000.0
        self.log = structlog.get_logger().bind(actor="sensor", sensor=name)
        self.incarnation = Incarnation.here()
        tower = None
        if self.sensor.modality in _media_towers(config.bundle):
            from mmfuse.bundle import load_bundle
            from mmfuse.inference import actor_device, limit_threads

            limit_threads()
            tower = load_bundle(config.bundle).towers([self.sensor.modality])[self.sensor.modality]
            tower.to(actor_device(self.sensor.num_gpus))
            tower.warm_up()
        from mmfuse.security import daemon_keys

        self.keys = daemon_keys(config)
        self.recorder_endpoint = None if config.recorder is None else config.recorder.endpoint
        self.unrecorded = 0
        self.gate = None
        self.new_ingest = lambda: build_ingest(config, self.sensor, dim, tower, self.log, self.keys)
        self.ingest = self.new_ingest()
        self.virtual_clock = virtual_clock
        self.ticks = SensorTicks(self.ingest, self.min_interval, self.flush_interval) if virtual_clock else None
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.started = threading.Event()
        self.start_error: str | None = None
        self.pushes = 0
        self.last_push = time.monotonic()
        self.drained_at = time.time()  # the socket was last found empty then
        self.numbered = 0
        self.retained: list[SensorBatch] = []
        self.push_failures = Tally()
        self.thread = threading.Thread(target=self._run, name=f"sensor-{name}", daemon=True)

    def ping(self) -> Incarnation:
        return self.incarnation

    def start(self) -> str | None:
        """Open the socket and start reading; None once it is up, else why it could not be opened."""
        if not self.thread.is_alive() and not self.started.is_set():
            self.thread.start()
        self.started.wait(30)
        return self.start_error if self.started.is_set() else "socket set-up timed out"

    def _run(self) -> None:
        import ray
        import zmq

        aligner = ray.get_actor("aligner")
        context = zmq.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, 0 if self.virtual_clock else 100_000)  # a replay may lose nothing
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, f"{self.sensor.modality}/".encode())
        if self.virtual_clock:
            socket.setsockopt(zmq.SUBSCRIBE, TICK_TOPIC)
        if self.keys is not None:
            from mmfuse.security import SENSORS, Gatekeeper, serve

            self.gate = Gatekeeper(context, self.log)
            self.gate.start()
            self.gate.admit(SENSORS, self.keys.sensors)
            serve(socket, self.keys.certificate, SENSORS)
            self.gate.watch(socket, SENSORS)
        try:
            if self.sensor.bind:
                socket.bind(self.sensor.endpoint)
            else:
                socket.connect(self.sensor.endpoint)
        except zmq.ZMQError as exc:
            self.start_error = f"sensor {self.sensor.name}: cannot {'bind' if self.sensor.bind else 'connect'} " \
                               f"{self.sensor.endpoint}: {exc}"
            self.started.set()
            return
        recorder = None if self.recorder_endpoint is None else self._connect_recorder(context)
        where = {"connect_to": wire.connect_address(self.sensor.endpoint, ray.util.get_node_ip_address())} \
            if self.sensor.bind else {}
        self.log.info("sensor listening", endpoint=self.sensor.endpoint, bind=self.sensor.bind, **where,
                      virtual_clock=self.virtual_clock, incarnation=self.incarnation.token,
                      authenticated=self.keys is not None)
        self.started.set()
        in_flight: list = []
        while not self.stopping.is_set():
            if self.gate is not None and not self.sensor.bind:
                self.gate.rejoin(socket, self.sensor.endpoint)
            if socket.poll(self.min_interval * 1000, zmq.POLLIN):
                for _ in range(READS_PER_WAKE):
                    started = time.time()
                    received = self._read(socket)
                    drained = len(received) < READ_MAX
                    if drained:  # what arrived before the read began has been read
                        self.drained_at = started
                    in_flight = self._handle(aligner, received, in_flight)
                    in_flight = self._push_if_due(aligner, in_flight)  # a backlog must not hold the aligner's news
                    if drained:
                        break
                if recorder is not None:
                    self._forward(recorder)
            else:
                self.drained_at = time.time()
            in_flight = self._push_if_due(aligner, in_flight)
        handle_until = time.monotonic() + STOP_HANDLING_S
        unread = 0
        while received := self._read(socket):  # drain what is already queued, then hand over the last batch
            if time.monotonic() < handle_until:
                in_flight = self._handle(aligner, received, in_flight)
            else:
                unread += len(received)
        self.drained_at = time.time()
        if unread:
            with self.lock:
                self.ingest.rejected.counts["unread_at_stop"] = unread
            self.log.warning("messages queued at stop left unread", count=unread, handled_for_s=STOP_HANDLING_S,
                             hint="the sensor was behind its sensors when the daemon stopped: it reads more "
                             "messages per second than this machine can handle")
        if recorder is not None:
            self._forward(recorder)
            recorder.close(linger=1000)
        if not self.virtual_clock:
            in_flight = self._push(aligner, in_flight, defer_media=False)
        self._settle(in_flight, timeout=10)
        socket.close()
        if self.gate is not None:
            self.gate.stop()

    def _connect_recorder(self, context):
        """A PUSH to mmfuse-record's endpoint. It queues only for a recorder that is connected (ZMQ_IMMEDIATE), so
        a recording starts when its recorder does, with nothing stale from before; a recorder that already listens
        is connected before the sensor's first message can arrive."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        recorder = context.socket(zmq.PUSH)
        recorder.setsockopt(zmq.IMMEDIATE, 1)
        recorder.setsockopt(zmq.SNDHWM, 100_000)
        if self.keys is not None:  # the recorder serves with the daemon's own certificate and admits only it
            from mmfuse.security import connect_as

            connect_as(recorder, self.keys.certificate, self.keys.certificate.public)
        settled = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL \
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        monitor = recorder.get_monitor_socket(settled)
        recorder.connect(self.recorder_endpoint)
        deadline = time.monotonic() + RECORDER_WAIT_S
        while (left := deadline - time.monotonic()) > 0 and monitor.poll(left * 1000):
            event = recv_monitor_message(monitor)["event"]
            if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.log.info("no recorder at the recorder endpoint yet; recording starts when one connects",
                              endpoint=self.recorder_endpoint, zmq_event=zmq.Event(event).name)
            break
        recorder.disable_monitor()
        monitor.close(linger=0)
        return recorder

    def _forward(self, recorder) -> None:
        """Hand mmfuse-record what was accepted; what it cannot take now (none connected, or it is behind by
        SNDHWM messages) is counted as `unrecorded`."""
        import zmq

        with self.lock:
            accepted = self.ingest.take_accepted()
        for topic, payload, arrived_at in accepted:
            try:
                recorder.send_multipart(wire.encode_accepted(self.sensor.name, topic, payload, arrived_at),
                                        zmq.NOBLOCK)
            except zmq.Again:
                self.unrecorded += 1

    def _read(self, socket) -> list[tuple[list[bytes], float, str | None]]:
        """Up to READ_MAX messages that are already queued, each with its receive time and, when sensors
        authenticate, the CURVE key it came from (the User-Id of its frames). Frame by frame: recv_multipart
        costs a microsecond more a message."""
        import zmq

        received = []
        while len(received) < READ_MAX:
            try:
                frame = socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            sender = None if self.keys is None else frame.get("User-Id")
            frames = [frame.bytes]
            while frame.more:  # (a message's frames arrive together)
                frame = socket.recv(copy=False)
                frames.append(frame.bytes)
            received.append((frames, time.time(), sender))
        return received

    def _handle(self, aligner, received: list[tuple[list[bytes], float, str | None]], in_flight: list) -> list:
        """Messages read together, live ones under one hold of the lock. A fault in handling one is counted and
        logged, and the sensor reads on: the reader thread must outlive any one message."""
        if self.virtual_clock:
            for frames, _, sender in received:  # (its receive time comes in a third frame)
                try:
                    in_flight = self._receive_on_virtual_clock(aligner, sender, frames, in_flight)
                except Exception as exc:
                    self._count_fault(exc)
            return in_flight
        with self.lock:
            if self.ingest.media is not None:  # a media message is prepared on its stream's clock as it is now
                for message in received:
                    self._guarded(self.ingest.ingest, *message)
                return in_flight
            checked = [self._guarded(self.ingest.check, *message) for message in received]
            try:
                checked = self.ingest.check_values(checked)
            except Exception:  # a fault in one message must not lose the others: check them one by one
                checked = [self._guarded(lambda frame: self.ingest.check_values([frame])[0], frame)
                           for frame in checked]
            for frame in checked:
                self._guarded(self.ingest.take, frame)
        return in_flight

    def _guarded(self, handle, *args):
        """handle(*args), or None when it fails: the fault is counted and logged, and the sensor reads on."""
        try:
            return handle(*args)
        except Exception as exc:
            self._count_fault(exc)
            return None

    def _count_fault(self, exc: Exception) -> None:
        self.log.exception("message handling failed", error=repr(exc))
        with self.lock:  # (reentrant: _handle may hold it)
            self.ingest.rejected.add("internal_error")

    def _receive_on_virtual_clock(self, aligner, sender: str | None, frames: list[bytes], in_flight: list) -> list:
        if frames[0] == TICK_TOPIC:
            if self.ingest.sender_key is not None and sender != self.ingest.sender_key:
                with self.lock:
                    self.ingest.reject("wrong_source", f"a clock tick from key {sender} on sensor {self.sensor.name}")
                return in_flight
            return self._tick(aligner, frames, in_flight)
        at = wire.receive_time(frames[-1]) if len(frames) == 3 else None
        with self.lock:
            if at is None:
                self.ingest.reject("virtual_clock", "this daemon runs on a replay's clock (--virtual-clock): messages "
                                   "need their receive time as a third frame, as mmfuse-replay --virtual-clock sends")
            else:
                self.ingest.ingest(frames[:2], at, sender)
        return in_flight

    def _tick(self, aligner, frames: list[bytes], in_flight: list) -> list:
        tick = parse_tick(frames)
        with self.lock:
            if tick is None:
                self.ingest.reject("tick", "a clock tick that is not a msgpack map of t and final")
                return in_flight
            report, batch = self.ticks.tick(tick)
            replay = self.ticks.replay
            if tick.final:  # the replay is over: start the next one afresh
                accepted, self.ingest = self.ingest.take_accepted(), self.new_ingest()
                self.ingest.accepted_frames = accepted
                self.ticks = SensorTicks(self.ingest, self.min_interval, self.flush_interval, replay + 1)
        if report:
            in_flight = self._send(in_flight, aligner.report.remote(self.sensor.name, tick, batch, replay))
        return in_flight

    def _push_if_due(self, aligner, in_flight: list) -> list:
        """A live sensor's batch, when one is due: streams that send nothing for longer than their silence limit
        (a few of their periods plus the flush interval) look dropped to the aligner, so a sensor working through
        a backlog pushes between reads as well."""
        if self.virtual_clock or not self.ingest.push_due(time.monotonic() - self.last_push, self.min_interval,
                                                          self.flush_interval, time.time(), self.gather):
            return in_flight
        self.last_push = time.monotonic()
        return self._push(aligner, in_flight)

    def _push(self, aligner, in_flight: list, defer_media: bool = True) -> list:
        """A batch (empty too: the aligner hears this sensor is alive) whose account of the streams is as of when
        the socket was last found empty: a stream whose messages wait unread behind a backlog is not silent."""
        with self.lock:
            now = time.time()
            batch = self.ingest.take_batch(min(now, self.drained_at), defer_media)
            batch.taken_at = now
            self.ingest.forget_idle(now)
            self._number(batch)
        return self._send(in_flight, aligner.push.remote(batch))

    def _number(self, batch: SensorBatch) -> None:
        """Number a live batch and keep it (on a virtual clock a replay interrupted by a restart is replayed again
        instead: its reports are not retained)."""
        batch.incarnation, batch.number = self.incarnation.token, self.numbered
        self.numbered += 1
        self.retained.append(batch)
        if len(self.retained) > RETAINED_MAX:
            del self.retained[0]

    def _send(self, in_flight: list, call) -> list:
        in_flight.append(call)
        self.pushes += 1
        if len(in_flight) > self.MAX_IN_FLIGHT:  # aligner is behind: wait rather than queue without bound
            in_flight = self._settle(in_flight, timeout=1.0, keep=self.MAX_IN_FLIGHT)
        return in_flight

    def _settle(self, in_flight: list, timeout: float, keep: int = 0) -> list:
        """Wait (at most `timeout`) until no more than `keep` calls are outstanding. A call the aligner could not
        take (it died) is counted: the batch stays retained for the aligner's next life."""
        import ray

        done, in_flight = ray.wait(in_flight, num_returns=max(0, len(in_flight) - keep), timeout=timeout)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                if self.push_failures.add(type(exc).__name__):
                    self.log.warning("aligner did not take a batch; it stays retained", error=type(exc).__name__,
                                     count=self.push_failures.counts[type(exc).__name__])
        return in_flight

    def retained_batches(self) -> list[SensorBatch]:
        """Every batch sent since the last confirmed aligner snapshot, for a restarted aligner."""
        with self.lock:
            return list(self.retained)

    def confirm(self, incarnation: str, number: int) -> None:
        """The supervisor holds an aligner snapshot with this sensor's batches up to `number` applied."""
        if incarnation != self.incarnation.token:
            return
        with self.lock:
            self.retained = [b for b in self.retained if b.number > number]

    def stop(self) -> dict:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        return self.stats()

    def read_metrics(self) -> tuple[str, list]:
        up = self.started.is_set() and self.start_error is None and self.thread.is_alive() \
            and not self.stopping.is_set()
        return self.incarnation.token, sensor_families(self.sensor.name, self.stats(), up)

    def stats(self) -> dict:
        with self.lock:
            counts = {} if self.gate is None else {"auth_refused": self.gate.refused_count}
            counts |= {"unrecorded": self.unrecorded} if self.unrecorded else {}
            return {**self.ingest.stats(), **counts, "pushes": self.pushes, "retained": len(self.retained),
                    **({"push_failures": dict(self.push_failures.counts)} if self.push_failures.counts else {})}


def _media_towers(bundle: str) -> dict:
    """The bundle's raw-media towers, from its manifest alone: a sensor of features needs no torch."""
    import json
    from pathlib import Path

    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest.get("media", {}).get("towers", {})
