"""`mmfuse-replay --config X --data file.npz`: publish a feature data set as live sensor streams.

Each row is one utterance of a session; rows are grouped into sessions by the video
part of `uid` and ordered by the utterance number. Utterance i of a session covers
[i*hop, (i+1)*hop) on the session's clock and is sent when it ends, on every
configured sensor of its modality, paced in real time divided by --speed.
"""

from __future__ import annotations

import argparse
import heapq
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import zmq

from mmfuse import wire
from mmfuse.bundle import BundleError, load_bundle
from mmfuse.daemon.config import ConfigError, DaemonConfig, load_config
from mmfuse.training.data import DataError, FeatureSet, load_features


@dataclass(frozen=True)
class Kill:
    modality: str
    at_s: float


def parse_drop(text: str) -> tuple[str, float]:
    match = re.fullmatch(r"(audio|visual|text):(0(?:\.\d+)?|1(?:\.0+)?)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--drop takes MODALITY:PROBABILITY such as text:0.3, got {text!r}")
    return match[1], float(match[2])


def parse_kill(text: str) -> Kill:
    match = re.fullmatch(r"(audio|visual|text)@(\d+(?:\.\d+)?)s?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--kill takes MODALITY@SECONDS such as visual@10s, got {text!r}")
    return Kill(match[1], float(match[2]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="daemon configuration: sensors and output endpoints")
    parser.add_argument("--data", required=True, help="features npz (MOSI schema)")
    parser.add_argument("--speed", default="1", help="time factor: 1 is real time, 10 is ten times faster")
    parser.add_argument("--drop", type=parse_drop, action="append", default=[], metavar="MODALITY:P",
                        help="each utterance of MODALITY is lost with probability P (the sensor stays alive)")
    parser.add_argument("--kill", type=parse_kill, action="append", default=[], metavar="MODALITY@Ts",
                        help="MODALITY's sensor falls silent T seconds into every session")
    parser.add_argument("--sessions", type=int, default=None, help="replay only the first N sessions")
    parser.add_argument("--held-out-by", metavar="BUNDLE", default=None,
                        help="replay only the sessions this bundle held out for validation (never trained on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --drop draws")
    parser.add_argument("--listen", action="store_true", help="print decisions from the daemon as they arrive")
    parser.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the daemon to subscribe")
    args = parser.parse_args(argv)
    try:
        args.speed = float(args.speed)
        if args.speed <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--speed takes a positive number, got {args.speed!r}")
    return args


@dataclass(order=True)
class Scheduled:
    due: float
    order: int
    sensor: str
    frames: list


def build_schedule(config: DaemonConfig, data: FeatureSet, args: argparse.Namespace) -> tuple[list, dict]:
    """Every message to send, by due time (seconds from start), and the label of each (session, window)."""
    hop = config.window.hop_s
    rng = np.random.default_rng(args.seed)
    drops = dict(args.drop)
    kills = {k.modality: k.at_s for k in args.kill}
    by_session = defaultdict(list)
    for row, uid in enumerate(data.uid):
        video, _, number = uid.rpartition("_")
        by_session[video].append((int(number) if number.isdigit() else row, row))
    sessions = list(by_session.items())
    if args.held_out_by:
        held_out = set(load_bundle(args.held_out_by).manifest["data"]["val_videos"])
        sessions = [(name, rows) for name, rows in sessions if name in held_out]
    sessions = sessions[: args.sessions]
    schedule, labels, order = [], {}, 0
    for session, utterances in sessions:
        utterances.sort()
        seq = defaultdict(int)
        for i, (_, row) in enumerate(utterances):
            t = i * hop
            labels[(session, i)] = int(data.label[row])
            for sensor in config.sensors:
                if sensor.modality not in data.features or t >= kills.get(sensor.modality, np.inf):
                    continue
                if rng.random() < drops.get(sensor.modality, 0.0):
                    message = wire.SensorMessage(session, sensor.name, sensor.modality, seq[sensor.name],
                                                 t + hop, kind="heartbeat")
                else:
                    message = wire.features_message(session, sensor.name, sensor.modality, seq[sensor.name], t,
                                                    data.features[sensor.modality][row], duration=hop)
                seq[sensor.name] += 1
                schedule.append(Scheduled((t + hop) / args.speed, order, sensor.name, wire.encode(message)))
                order += 1
        end_t = len(utterances) * hop
        for sensor in config.sensors:
            if sensor.modality in data.features and end_t < kills.get(sensor.modality, np.inf):
                message = wire.SensorMessage(session, sensor.name, sensor.modality, seq[sensor.name], end_t, kind="end")
                schedule.append(Scheduled(end_t / args.speed, order, sensor.name, wire.encode(message)))
                order += 1
    heapq.heapify(schedule)
    return schedule, labels


def open_sockets(context: zmq.Context, config: DaemonConfig, wait_s: float) -> dict[str, zmq.Socket]:
    """One XPUB per sensor, so that we can wait until the daemon has subscribed."""
    sockets = {}
    for sensor in config.sensors:
        socket = context.socket(zmq.XPUB)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.LINGER, 5000)
        if sensor.bind:
            socket.connect(sensor.endpoint)
        else:
            socket.bind(sensor.endpoint)
        sockets[sensor.name] = socket
    deadline = time.monotonic() + wait_s
    for name, socket in sockets.items():
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not socket.poll(remaining * 1000, zmq.POLLIN):
            raise TimeoutError(f"no subscriber on sensor {name} within {wait_s:.0f} s: is mmfuse-daemon running "
                               f"with the same configuration?")
        socket.recv()
    return sockets


def format_decision(decision: dict, truth: int | None, labels: list[str]) -> str:
    window = decision["window"]
    mark = ""
    if truth is not None and truth < len(labels):
        mark = "  ok" if decision["label"] == labels[truth] else f"  (truth {labels[truth]})"
    score = decision["scores"].get(decision["label"], 0.0)
    extras = []
    if decision["restored"]:
        extras.append(f"restored={','.join(decision['restored'])}")
    if decision["dropped"]:
        extras.append(f"dropped={','.join(decision['dropped'])}")
    return (f"{decision['session']:>14} w{window['id']:<3} [{window['start']:6.1f},{window['end']:6.1f})  "
            f"{decision['label']:>9} {score:.2f}  present={','.join(decision['present'])} "
            f"{' '.join(extras)}  {decision['latency_ms']:.1f} ms{mark}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        data = load_features(args.data)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        schedule, truth = build_schedule(config, data, args)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label_names = ["negative", "positive"] if data.sentiment is not None else []
    context = zmq.Context.instance()
    listener = None
    if args.listen:
        listener = context.socket(zmq.SUB)
        listener.setsockopt(zmq.SUBSCRIBE, b"decision/")
        listener.connect(config.output.endpoint)
    try:
        sockets = open_sockets(context, config, args.wait_s)
    except (TimeoutError, zmq.ZMQError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    sessions = len({s for s, _ in truth})
    print(f"replaying {len(truth)} utterances of {sessions} session(s) from {args.data} at speed {args.speed:g}",
          file=sys.stderr)

    received, correct = 0, 0

    def receive(timeout_s: float) -> None:
        nonlocal received, correct
        if listener is None:
            time.sleep(max(0.0, timeout_s))
            return
        if listener.poll(max(0.0, timeout_s) * 1000, zmq.POLLIN):
            while True:
                try:
                    decision = wire.decode_decision(listener.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                except wire.WireError as exc:
                    print(f"skipped a malformed decision: {exc}", file=sys.stderr)
                    continue
                label = truth.get((decision["session"], decision["window"]["id"]))
                received += 1
                correct += label is not None and label_names and decision["label"] == label_names[label]
                print(format_decision(decision, label, label_names), flush=True)

    start = time.monotonic()
    while schedule:
        item = schedule[0]
        wait = start + item.due - time.monotonic()
        if wait > 0:
            receive(wait)
            continue
        heapq.heappop(schedule)
        sockets[item.sensor].send_multipart(item.frames)
    if listener is not None:
        quiet_until = time.monotonic() + config.drop.timeout_s + 3.0
        while time.monotonic() < quiet_until and received < len(truth):
            receive(0.2)
        accuracy = f", accuracy {correct / received:.3f}" if received and label_names else ""
        print(f"{received} decision(s) for {len(truth)} utterance(s){accuracy}", file=sys.stderr)
    for socket in sockets.values():
        socket.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
