"""`mmfuse-record --config X --out session.mcap`: write a session into an MCAP recording.

With `recorder: {endpoint: ...}` in the configuration it records what the running daemon
accepted: the daemon's sensor actors push every message they accept to that endpoint,
with its receive time, so nothing the daemon used is missing, not even a stream's first
message. Without it, it subscribes to the sensors as the daemon does and writes everything
valid they send; it can then miss what sensors sent before its subscription was live.

One channel per source; each message keeps its original payload bytes, log time =
receive time, publish time = origin time, sequence = `seq` (see mmfuse/recording.py).
`--decisions` also records the daemon's decisions. Stops on Ctrl-C / SIGTERM or after
--duration-s, and always finishes the file so that it stays readable; what it recorded goes to the
file every second, so a recorder killed outright leaves a file that mmfuse-replay reads up to that point.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from mmfuse import wire
from mmfuse.config import ConfigError, DaemonConfig, load_config
from mmfuse.logs import Tally
from mmfuse.recording import RecordingWriter
from mmfuse.security import (RECORDER, SENSORS, DaemonKeys, Gatekeeper, SecurityError, client_keys, connect_as,
                             daemon_keys, serve)

FLUSH_S = 1.0  # what was recorded goes to the file as a finished chunk this often: a killed recorder loses no more


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="daemon configuration: the sensors to record")
    parser.add_argument("--out", required=True, help="MCAP file to write (a new one, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--decisions", action="store_true", help="also record decisions from output.endpoint")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: on signal)")
    parser.add_argument("--key", action="append", default=[], metavar="NAME.key_secret",
                        help="with security.curve and --decisions: the consumer certificate to read decisions with "
                        "(the sensors are received as the daemon receives them, with its key)")
    args = parser.parse_args(argv)
    if args.duration_s is not None and not 0 < args.duration_s < float("inf"):
        parser.error(f"--duration-s takes a positive number of seconds, got {args.duration_s:g}; leave it out to "
                     f"record until Ctrl-C or SIGTERM")
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; give the MCAP file to write, e.g. {Path(args.out) / 'session.mcap'}")
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists (an earlier recording?); give a new file name, or --overwrite to "
                     f"replace it")
    return args


class SensorSubscriptions:
    """One SUB per sensor, as the daemon's own: records what the sensors send from the moment each
    subscription is live."""

    def __init__(self, context: zmq.Context, config: DaemonConfig, keys: DaemonKeys | None, gate: Gatekeeper | None):
        self.config, self.keys, self.gate = config, keys, gate
        self.sensors = {}
        for sensor in config.sensors:
            socket = context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, 100_000)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, f"{sensor.modality}/".encode())
            if keys is not None:
                serve(socket, keys.certificate, SENSORS)
                gate.watch(socket, SENSORS)
            socket.connect(sensor.endpoint)
            self.sensors[socket] = sensor

    @property
    def sockets(self) -> list[zmq.Socket]:
        return list(self.sensors)

    def started(self) -> str:
        return f"recording {len(self.sensors)} sensor(s) as they send"

    def close(self) -> None:
        for socket in self.sensors:
            socket.close()

    def look_after(self) -> None:
        if self.gate is not None:
            for socket, sensor in self.sensors.items():
                self.gate.rejoin(socket, sensor.endpoint)

    def record(self, socket: zmq.Socket, writer: RecordingWriter, rejected: Tally) -> None:
        """Write everything queued on one socket; with keys, only what a sensor's own key sent as that sensor."""
        sensor = self.sensors[socket]
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=self.keys is None)
            except zmq.Again:
                return
            now, problem = time.time(), None
            if self.keys is not None:
                sender, frames = frames[0].get("User-Id"), [frame.bytes for frame in frames]
                wanted = self.keys.sender_key(sensor.name)
                problem = f"wrong_source: from key {sender}, not {wanted}" if wanted not in (None, sender) else None
            try:
                message = wire.decode(frames, self.config.pipeline.max_payload_bytes)
            except wire.WireError as exc:
                problem = problem or str(exc)
            else:
                if self.keys is not None and message.source != sensor.name and message.source in self.keys.sensor_keys:
                    problem = problem or f"wrong_source: {message.source} sent on sensor {sensor.name}"
            if problem is not None:
                reject(rejected, problem)
                continue
            writer.sensor_message(sensor.name, message, frames[1], now)


class AcceptedStream:
    """The daemon's accepted messages: its sensor actors connect to `recorder.endpoint` and push each message
    they accepted, with the time they received it. With CURVE only the daemon's own key may connect."""

    def __init__(self, context: zmq.Context, config: DaemonConfig, keys: DaemonKeys | None, gate: Gatekeeper | None):
        self.config, self.expected, self.connected = config, len(config.sensors), 0
        self.names = {s.name for s in config.sensors}
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            gate.admit(RECORDER, frozenset({keys.certificate.public}))
            serve(self.socket, keys.certificate, RECORDER)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.socket.bind(config.recorder.endpoint)

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [self.socket]

    def started(self) -> str:
        return (f"recording what the daemon accepts, from {self.config.recorder.endpoint}; waiting for its "
                f"{self.expected} sensor actor(s)")

    def look_after(self) -> None:
        """Say when every sensor actor of the daemon is connected, and when one goes (a restart, or the daemon)."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            before = self.connected
            self.connected += 1 if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else -1
            if self.connected >= self.expected > before:
                print(f"recording: all {self.expected} sensor actor(s) of the daemon connected", file=sys.stderr)
            elif self.connected < self.expected <= before:
                print(f"a sensor actor of the daemon disconnected ({max(0, self.connected)} of {self.expected} "
                      f"connected); it reconnects when it is back", file=sys.stderr)

    def record(self, socket: zmq.Socket, writer: RecordingWriter, rejected: Tally) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                sensor, message_frames, arrived_at = wire.decode_accepted(frames)
                message = wire.decode(message_frames, self.config.pipeline.max_payload_bytes)
            except wire.WireError as exc:
                reject(rejected, str(exc))
                continue
            if sensor not in self.names:
                reject(rejected, f"sensor: {sensor!r} is not a sensor of this configuration")
                continue
            writer.sensor_message(sensor, message, message_frames[1], arrived_at)

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)


def reject(rejected: Tally, problem: str) -> None:
    if rejected.add(problem.partition(":")[0]):
        print(f"rejected a message ({problem})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bound = [s.name for s in config.sensors if s.bind]
    if bound and config.recorder is None:
        print(f"error: sensor(s) {', '.join(bound)} have bind: true, so the daemon binds their endpoints and the "
              f"recorder cannot bind them too; set recorder.endpoint to record what the daemon accepts, or record "
              f"sensors that bind their own endpoints (the default)", file=sys.stderr)
        return 2
    try:
        keys = daemon_keys(config)
        consumer = client_keys(config, args.key, as_sensors=False) if args.decisions else None
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    context = zmq.Context.instance()
    gate = None
    if keys is not None:
        gate = Gatekeeper(context, structlog.get_logger().bind(actor="record"))
        gate.start()
        gate.admit(SENSORS, keys.sensors)

    def close_sockets(source=None) -> None:
        if source is not None:
            source.close()
        if gate is not None:
            gate.stop()
        context.destroy(linger=0)

    poller = zmq.Poller()
    try:
        source = (SensorSubscriptions if config.recorder is None else AcceptedStream)(context, config, keys, gate)
        for socket in source.sockets:
            poller.register(socket, zmq.POLLIN)
        decisions = None
        if args.decisions:
            decisions = context.socket(zmq.SUB)
            decisions.setsockopt(zmq.SUBSCRIBE, b"decision/")
            if consumer is not None:
                connect_as(decisions, consumer.consumer, consumer.server)
            decisions.connect(config.output.endpoint)
            poller.register(decisions, zmq.POLLIN)
    except zmq.ZMQError as exc:
        print(f"error: cannot open the recorder's sockets: {exc}", file=sys.stderr)
        close_sockets()
        return 3

    try:
        writer = RecordingWriter(args.out, config.model_dump(mode="json"))
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        close_sockets(source)
        return 2
    rejected = Tally()
    stopping = None

    def stop(signum, _frame):
        nonlocal stopping
        stopping = signum

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + args.duration_s if args.duration_s else float("inf")
    print(f"{source.started()} into {args.out}; Ctrl-C stops", file=sys.stderr)
    next_flush = time.monotonic() + FLUSH_S
    try:
        while stopping is None and time.monotonic() < deadline:
            source.look_after()
            for socket, _ in poller.poll(100):
                if socket is decisions:
                    record_decisions(decisions, writer)
                else:
                    source.record(socket, writer, rejected)
            if time.monotonic() >= next_flush:
                writer.flush()
                next_flush = time.monotonic() + FLUSH_S
    finally:
        if gate is not None and gate.refused_count:
            rejected.counts["auth_refused"] = gate.refused_count
        writer.close(dict(rejected.counts))
        close_sockets(source)
    print(f"wrote {writer.messages} sensor message(s) on {len(writer.channels)} channel(s) to {args.out}"
          + (f"; rejected {dict(rejected.counts)}" if rejected.counts else ""), file=sys.stderr)
    return 130 if stopping == signal.SIGINT else 0  # Ctrl-C, as for every command; SIGTERM and --duration-s: 0


def record_decisions(socket: zmq.Socket, writer: RecordingWriter) -> None:
    while True:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        writer.decision(frames[-1], time.time())


if __name__ == "__main__":
    sys.exit(main())
