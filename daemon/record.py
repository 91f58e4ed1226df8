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

import zmq

from mmfuse import wire
from mmfuse.config import ConfigError, load_config
from mmfuse.logs import Tally
from mmfuse.recording import RecordingWriter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="daemon configuration: the sensors to record")
    parser.add_argument("--out", required=True, help="MCAP file to write")
    parser.add_argument("--decisions", action="store_true", help="also record decisions from output.endpoint")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: on signal)")
    return parser.parse_args(argv)


def record_pending(socket, decisions, sensors: dict, writer: RecordingWriter, rejected: Tally, max_payload: int) -> None:
    """Write everything queued on one socket."""
    while True:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        now = time.time()
        if socket is decisions:
            writer.decision(frames[-1], now)
            continue
        try:
            message = wire.decode(frames, max_payload)
        except wire.WireError as exc:
            if rejected.add(exc.reason):
                print(f"rejected a malformed message ({exc})", file=sys.stderr)
            continue
        writer.sensor_message(sensors[socket].name, message, frames[1], now)


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
    context = zmq.Context.instance()
    poller = zmq.Poller()
    sensors = {}
    try:
        for sensor in config.sensors:
            socket = context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, 100_000)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, f"{sensor.modality}/".encode())
            socket.connect(sensor.endpoint)
            sensors[socket] = sensor
            poller.register(socket, zmq.POLLIN)
        decisions = None
        if args.decisions:
            decisions = context.socket(zmq.SUB)
            decisions.setsockopt(zmq.SUBSCRIBE, b"decision/")
            decisions.connect(config.output.endpoint)
            poller.register(decisions, zmq.POLLIN)
    except zmq.ZMQError as exc:
        print(f"error: cannot open a sensor socket: {exc}", file=sys.stderr)
        return 3

    writer = RecordingWriter(args.out, config.model_dump(mode="json"))
    rejected = Tally()
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + args.duration_s if args.duration_s else float("inf")
    print(f"recording {len(sensors)} sensor(s) into {args.out}; Ctrl-C stops", file=sys.stderr)
    try:
        while not stopping and time.monotonic() < deadline:
            for socket, _ in poller.poll(100):
                record_pending(socket, decisions, sensors, writer, rejected, config.pipeline.max_payload_bytes)
    finally:
        writer.close(dict(rejected.counts))
        context.destroy(linger=0)
    print(f"wrote {writer.messages} sensor message(s) on {len(writer.channels)} channel(s) to {args.out}"
          + (f"; rejected {dict(rejected.counts)}" if rejected.counts else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
