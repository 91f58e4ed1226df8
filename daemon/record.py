"""`mmfuse-record --config X --out session.mcap`: subscribe to the sensors exactly as the
daemon does and write everything valid they send into an MCAP recording.

One channel per source; each message keeps its original payload bytes, log time =
receive time, publish time = origin time, sequence = `seq` (see mmfuse/recording.py).
`--decisions` also records the daemon's decisions. Stops on Ctrl-C / SIGTERM or after
--duration-s, and always finishes the file so that it stays readable.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import structlog
import zmq

from mmfuse import wire
from mmfuse.config import ConfigError, load_config
from mmfuse.logs import Tally
from mmfuse.recording import RecordingWriter
from mmfuse.security import SENSORS, DaemonKeys, Gatekeeper, SecurityError, client_keys, connect_as, daemon_keys, serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="daemon configuration: the sensors to record")
    parser.add_argument("--out", required=True, help="MCAP file to write")
    parser.add_argument("--decisions", action="store_true", help="also record decisions from output.endpoint")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: on signal)")
    parser.add_argument("--key", action="append", default=[], metavar="NAME.key_secret",
                        help="with security.curve and --decisions: the consumer certificate to read decisions with "
                        "(the sensors are received as the daemon receives them, with its key)")
    return parser.parse_args(argv)


def record_pending(socket, decisions, sensors: dict, writer: RecordingWriter, rejected: Tally, max_payload: int,
                   keys: DaemonKeys | None) -> None:
    """Write everything queued on one socket; with `keys`, only what a sensor's own key sent as that sensor."""
    while True:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK, copy=keys is None or socket is decisions)
        except zmq.Again:
            return
        now = time.time()
        if socket is decisions:
            writer.decision(frames[-1], now)
            continue
        sensor, problem = sensors[socket], None
        if keys is not None:
            sender, frames = frames[0].get("User-Id"), [frame.bytes for frame in frames]
            wanted = keys.sender_key(sensor.name)
            problem = f"wrong_source: from key {sender}, not {wanted}" if wanted not in (None, sender) else None
        try:
            message = wire.decode(frames, max_payload)
        except wire.WireError as exc:
            problem = problem or str(exc)
        else:
            if keys is not None and message.source != sensor.name and message.source in keys.sensor_keys:
                problem = problem or f"wrong_source: {message.source} sent on sensor {sensor.name}"
        if problem is not None:
            if rejected.add(problem.partition(":")[0]):
                print(f"rejected a message ({problem})", file=sys.stderr)
            continue
        writer.sensor_message(sensor.name, message, frames[1], now)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bound = [s.name for s in config.sensors if s.bind]
    if bound:
        print(f"error: sensor(s) {', '.join(bound)} have bind: true, so the daemon binds their endpoints and the "
              f"recorder cannot bind them too; record sensors that bind their own endpoints (the default)",
              file=sys.stderr)
        return 2
    try:
        keys = daemon_keys(config)
        consumer = client_keys(config, args.key, as_sensors=False) if args.decisions else None
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    context = zmq.Context.instance()
    poller = zmq.Poller()
    sensors = {}
    gate = None
    if keys is not None:
        gate = Gatekeeper(context, structlog.get_logger().bind(actor="record"))
        gate.start()
        gate.admit(SENSORS, keys.sensors)
    try:
        for sensor in config.sensors:
            socket = context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, 100_000)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, f"{sensor.modality}/".encode())
            if keys is not None:
                serve(socket, keys.certificate, SENSORS)
                gate.watch(socket, SENSORS)
            socket.connect(sensor.endpoint)
            sensors[socket] = sensor
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
        print(f"error: cannot open a sensor socket: {exc}", file=sys.stderr)
        return 3

    writer = RecordingWriter(args.out, config.model_dump(mode="json"))
    rejected = Tally()
    stopping = None

    def stop(signum, _frame):
        nonlocal stopping
        stopping = signum

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + args.duration_s if args.duration_s else float("inf")
    print(f"recording {len(sensors)} sensor(s) into {args.out}; Ctrl-C stops", file=sys.stderr)
    try:
        while stopping is None and time.monotonic() < deadline:
            if gate is not None:
                for socket, sensor in sensors.items():
                    gate.rejoin(socket, sensor.endpoint)
            for socket, _ in poller.poll(100):
                record_pending(socket, decisions, sensors, writer, rejected, config.pipeline.max_payload_bytes, keys)
    finally:
        if gate is not None and gate.refused_count:
            rejected.counts["auth_refused"] = gate.refused_count
        writer.close(dict(rejected.counts))
        if gate is not None:
            gate.stop()
        context.destroy(linger=0)
    print(f"wrote {writer.messages} sensor message(s) on {len(writer.channels)} channel(s) to {args.out}"
          + (f"; rejected {dict(rejected.counts)}" if rejected.counts else ""), file=sys.stderr)
    return 130 if stopping == signal.SIGINT else 0  # Ctrl-C, as for every command; SIGTERM and --duration-s: 0


if __name__ == "__main__":
    sys.exit(main())
