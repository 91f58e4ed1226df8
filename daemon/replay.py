"""`mmfuse-replay --config X --data FILE`: publish a data set as live sensor streams.

Each row is one utterance of a session; rows are grouped into sessions by the video
part of `uid` and ordered by the utterance number. Utterance i of a session covers
[i*hop, (i+1)*hop) on the session's clock and goes to every configured sensor of
its modality, paced in real time divided by --speed.

FILE is a features npz (each utterance one `features` message, sent when it ends) or
a media manifest (JSONL, as mmfuse-train reads): the image becomes a camera sending
it as `jpeg` frames at --fps, the text an ASR segment (`utf8`) over the utterance, the
audio (WAV) `pcm16` chunks of 100 ms, each sent when its span ends.

`mmfuse-replay session.mcap` publishes a recording made by mmfuse-record: every
message's original bytes, to the sensor that received it, paced by receive time
(--speed max: as fast as possible); the configuration defaults to the one recorded.
`mmfuse-replay file.xdf --config X --map NAME=MODALITY ...` publishes Lab Streaming
Layer streams (clock offsets applied by pyxdf): numeric streams as `features` in
chunks of 100 ms, string streams as `utf8`, one session named after the file.
`mmfuse-replay FILE --list` prints each channel or stream: message count, time span,
clock offsets, gaps and clock resets.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack
import numpy as np
import zmq

from mmfuse import wire
from mmfuse.config import ConfigError, DaemonConfig, load_config
from mmfuse.datasets import DataError, load_features
from mmfuse.options import count, positive, positive_int
from mmfuse.security import ClientKeys, SecurityError, client_keys, connect_as
from mmfuse.virtual_clock import TICK_TOPIC, Tick, replay_ticks, replay_times, tick_frames

LONG_GAP_S = 60.0  # a pause of the recording longer than this (at the replay's speed) is announced


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
    parser.add_argument("recording", nargs="?", help="an MCAP recording or an XDF file")
    parser.add_argument("--config", help="daemon configuration: sensors and output endpoints "
                        "(for an mmfuse recording, default: the one it was recorded with)")
    parser.add_argument("--data", help="features npz (MOSI schema) or media manifest (JSONL)")
    parser.add_argument("--list", action="store_true", help="describe the recording's channels or streams and exit")
    parser.add_argument("--map", action="append", default=[], metavar="NAME=MODALITY",
                        help="XDF: publish stream NAME as MODALITY (audio, visual, text)")
    parser.add_argument("--fps", type=positive, default=5.0, help="camera frame rate when replaying images")
    parser.add_argument("--speed", default="1",
                        help="time factor: 1 is real time, 10 is ten times faster, max as fast as possible; "
                        "other than 1 only with --virtual-clock gives a live daemon's decisions")
    parser.add_argument("--drop", type=parse_drop, action="append", default=[], metavar="MODALITY:P",
                        help="each utterance of MODALITY is lost with probability P (the sensor stays alive)")
    parser.add_argument("--kill", type=parse_kill, action="append", default=[], metavar="MODALITY@Ts",
                        help="MODALITY's sensor falls silent T seconds into every session")
    parser.add_argument("--sessions", type=positive_int, default=None, help="replay only the first N sessions")
    parser.add_argument("--held-out-by", metavar="BUNDLE", default=None,
                        help="replay only the sessions this bundle held out for validation (never trained on)")
    parser.add_argument("--seed", type=count, default=0, help="seed of the --drop draws")
    parser.add_argument("--virtual-clock", action="store_true",
                        help="run the daemon (started with --virtual-clock) on the recording's timeline: every "
                        "message carries its receive time, ticks carry the clock; decisions are the same on every "
                        "run and at any --speed")
    parser.add_argument("--listen", action="store_true", help="print decisions from the daemon as they arrive")
    parser.add_argument("--wait-s", type=positive, default=30.0, help="how long to wait for the daemon to subscribe")
    parser.add_argument("--key", action="append", default=[], metavar="NAME.key_secret",
                        help="with security.curve in the configuration: the certificate to publish with (repeat it "
                        "for sensors that each have their own public_key) and to --listen with; the daemon's public "
                        "key comes from the configuration")
    args = parser.parse_args(argv)
    try:
        args.speed = float("inf") if args.speed == "max" else float(args.speed)
        if not args.speed > 0:  # (nan too)
            raise ValueError
    except ValueError:
        parser.error(f"--speed takes a positive number or max, got {args.speed!r}")
    if (args.recording is None) == (args.data is None):
        parser.error("give either a recording (MCAP or XDF) or --data FILE")
    if args.recording and not args.recording.endswith((".mcap", ".xdf")):
        parser.error(f"{args.recording}: a recording is an .mcap or .xdf file; use --data for npz and JSONL files")
    if not args.config and not args.list and not (args.recording or "").endswith(".mcap"):
        parser.error("--config is required")
    try:
        args.map = dict(parse_map(m) for m in args.map)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def parse_map(text: str) -> tuple[str, str]:
    name, _, modality = text.rpartition("=")
    if not name or modality not in ("audio", "visual", "text"):
        raise ValueError(f"--map takes NAME=MODALITY with MODALITY audio, visual or text, got {text!r}")
    return name, modality


@dataclass(order=True)
class Scheduled:
    due: float          # receive time on the source's timeline: paced from the first at --speed
    order: int
    sensor: str
    frames: list


class Utterances:
    """Rows replayed one utterance per window. A sensor stays alive while an utterance lasts, heartbeating
    every HEARTBEAT_S (the protocol's rule for sparse sources), so no window waits on a silent sensor."""

    HEARTBEAT_S = 0.25

    def alive(self, sensor, session: str, seq: int, t: float, hop: float):
        """Heartbeats while an utterance lasts: delivered up to its start, and alive."""
        for j in range(1, int(hop / self.HEARTBEAT_S)):
            yield t + j * self.HEARTBEAT_S, wire.SensorMessage(session, sensor.name, sensor.modality, seq + j - 1, t,
                                                               kind="heartbeat")

    def lost(self, sensor, session: str, seq: int, t: float, hop: float):
        """An utterance the sensor lost: it stays alive throughout and then says it is past it."""
        beats = list(self.alive(sensor, session, seq, t, hop))
        yield from beats
        yield t + hop, wire.SensorMessage(session, sensor.name, sensor.modality, seq + len(beats), t + hop,
                                          kind="heartbeat")


class FeatureRows(Utterances):
    """An npz: one `features` message per utterance and modality, at the utterance's end."""

    def __init__(self, path: str):
        self.data = load_features(path)
        names = self.data.label_names or (["negative", "positive"] if self.data.sentiment is not None else None)
        self.modalities = set(self.data.features)
        self.uid = self.data.uid
        self.truth = [names[k] if names and k < len(names) else None for k in self.data.label]

    def messages(self, row: int, sensor, session: str, seq: int, t: float, hop: float):
        beats = list(self.alive(sensor, session, seq, t, hop))
        yield from beats
        yield t + hop, wire.features_message(session, sensor.name, sensor.modality, seq + len(beats), t,
                                             self.data.features[sensor.modality][row], duration=hop)


class MediaRows(Utterances):
    """A media manifest: camera frames, an ASR segment and audio chunks per utterance."""

    CHUNK_S = 0.1

    def __init__(self, path: str, fps: float):
        from mmfuse.datasets import manifest_modalities, read_manifest

        self.rows = read_manifest(path)
        self.modalities = set(manifest_modalities(self.rows))
        self.uid = np.array([r.uid for r in self.rows])
        self.truth = [r.label for r in self.rows]
        self.fps = fps

    def _jpeg(self, path) -> bytes:
        data = path.read_bytes()
        if data[:2] == b"\xff\xd8":
            return data
        import io

        from PIL import Image

        buffer = io.BytesIO()
        with Image.open(path) as image:
            image.convert("RGB").save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    def messages(self, row: int, sensor, session: str, seq: int, t: float, hop: float):
        record = self.rows[row]
        if sensor.modality == "visual":
            frame = self._jpeg(record.image)
            for j in range(max(1, int(hop * self.fps))):  # a frame covers 1/fps: the last one reaches the window end
                yield t + (j + 1) / self.fps, wire.jpeg_message(session, sensor.name, seq + j, t + j / self.fps, frame,
                                                                duration=1 / self.fps)
        elif sensor.modality == "text":  # an ASR result comes at the utterance's end: stay alive until then
            beats = list(self.alive(sensor, session, seq, t, hop))
            yield from beats
            yield t + hop, wire.text_message(session, sensor.name, seq + len(beats), t, record.text, hop)
        else:
            from mmfuse.datasets import read_wav

            rate = 16000
            samples = np.resize(read_wav(record.audio, rate), int(hop * rate))  # looped or cut to the utterance
            chunk = int(self.CHUNK_S * rate)
            for j, start in enumerate(range(0, len(samples), chunk)):
                piece = samples[start:start + chunk]
                yield t + (start + len(piece)) / rate, wire.pcm16_message(session, sensor.name, seq + j,
                                                                         t + start / rate, piece, rate)


def load_rows(args: argparse.Namespace):
    return MediaRows(args.data, args.fps) if args.data.endswith(".jsonl") else FeatureRows(args.data)


def build_schedule(config: DaemonConfig, data, args: argparse.Namespace) -> tuple[list, dict]:
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
        from mmfuse.bundle import load_bundle

        held_out = set(load_bundle(args.held_out_by).manifest["data"]["val_videos"])
        sessions = [(name, rows) for name, rows in sessions if name in held_out]
    sessions = sessions[: args.sessions]
    schedule, labels, order = [], {}, 0
    for session, utterances in sessions:
        utterances.sort()
        seq = defaultdict(int)
        for i, (_, row) in enumerate(utterances):
            t = i * hop
            labels[(session, i)] = data.truth[row]
            for sensor in config.sensors:
                if sensor.modality not in data.modalities or t >= kills.get(sensor.modality, np.inf):
                    continue
                if rng.random() < drops.get(sensor.modality, 0.0):
                    sent = list(data.lost(sensor, session, seq[sensor.name], t, hop))
                else:
                    sent = list(data.messages(row, sensor, session, seq[sensor.name], t, hop))
                seq[sensor.name] += len(sent)
                for due, message in sent:
                    schedule.append(Scheduled(due, order, sensor.name, wire.encode(message)))
                    order += 1
        end_t = len(utterances) * hop
        for sensor in config.sensors:
            if sensor.modality in data.modalities and end_t < kills.get(sensor.modality, np.inf):
                message = wire.SensorMessage(session, sensor.name, sensor.modality, seq[sensor.name], end_t, kind="end")
                schedule.append(Scheduled(end_t, order, sensor.name, wire.encode(message)))
                order += 1
    return schedule, labels


def recording_schedule(messages) -> list[Scheduled]:
    """A recording's messages, due at their receive times."""
    return [Scheduled(m.received, i, m.sensor, [m.topic, m.payload]) for i, m in enumerate(messages)]


def xdf_schedule(path: str, config: DaemonConfig, mapping: dict[str, str]) -> list[Scheduled]:
    """LSL streams as wire messages on the configured sensor of their mapped modality."""
    import pyxdf

    from mmfuse.recording import RecordingError

    try:
        streams, _ = pyxdf.load_xdf(path, synchronize_clocks=True, handle_clock_resets=True)
    except Exception as exc:  # pyxdf raises assorted errors on damaged files
        raise RecordingError(f"{path}: not a readable XDF file ({exc})") from None
    names = {s["info"]["name"][0] for s in streams}
    if not mapping:
        raise RecordingError(f"an XDF file needs --map NAME=MODALITY for each stream to publish (its streams: "
                             f"{', '.join(sorted(names)) or 'none'}; --list describes them)")
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise RecordingError(f"{path} has no stream {', '.join(unknown)}; it has {', '.join(sorted(names))}")
    sensors = {}
    for modality in set(mapping.values()):
        sensor = next((s for s in config.sensors if s.modality == modality), None)
        if sensor is None:
            raise RecordingError(f"--map publishes {modality}, but the configuration has no {modality} sensor")
        sensors[modality] = sensor
    session = Path(path).stem
    timed = []
    for stream in streams:
        name = stream["info"]["name"][0]
        if name not in mapping or not len(stream["time_stamps"]):
            if name in mapping:
                print(f"stream {name} is empty: nothing to publish", file=sys.stderr)
            continue
        sensor = sensors[mapping[name]]
        times = np.asarray(stream["time_stamps"], dtype=float)
        values = stream["time_series"]
        if isinstance(values, list):  # string stream: each sample one text segment
            timed += [(t, sensor, wire.text_message(session, sensor.name, 0, t, str(sample[0]), 0.0))
                      for t, sample in zip(times, values)]
            continue
        values = np.asarray(values, dtype=np.float32)
        chunk = np.floor((times - times[0]) / 0.1).astype(int)
        for k in np.unique(chunk):
            rows = np.flatnonzero(chunk == k)
            t0, t1 = times[rows[0]], times[rows[-1]] + (times[1] - times[0] if len(times) > 1 else 0.0)
            timed.append((t1, sensor, wire.SensorMessage(
                session, sensor.name, sensor.modality, 0, t0, encoding="features", data=values[rows].tobytes(),
                shape=(len(rows), values.shape[1]), dtype="<f4", duration=t1 - t0)))
    timed.sort(key=lambda item: item[0])
    if not timed:
        raise RecordingError(f"{path}: the mapped streams hold no samples")
    seq, schedule = defaultdict(int), []
    for order, (due, sensor, message) in enumerate(timed):  # each sensor's messages numbered in time order
        message = replace(message, seq=seq[sensor.name])
        seq[sensor.name] += 1
        schedule.append(Scheduled(due, order, sensor.name, wire.encode(message)))
    last = timed[-1][0]
    for sensor in sensors.values():
        end = wire.SensorMessage(session, sensor.name, sensor.modality, seq[sensor.name], last, kind="end")
        schedule.append(Scheduled(last, len(schedule), sensor.name, wire.encode(end)))
    return schedule


def open_sockets(context: zmq.Context, config: DaemonConfig, wait_s: float,
                 virtual_clock: bool, keys: ClientKeys | None = None) -> dict[str, zmq.Socket]:
    """One XPUB per sensor, so that we can wait until the daemon has subscribed (on a virtual clock: to the
    ticks as well, or the first ones would be lost)."""
    sockets = {}
    for sensor in config.sensors:
        socket = context.socket(zmq.XPUB)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.LINGER, 5000)
        if keys is not None:
            connect_as(socket, keys.sensors[sensor.name], keys.server)
        if sensor.bind:
            socket.connect(sensor.endpoint)
        else:
            socket.bind(sensor.endpoint)
        sockets[sensor.name] = socket
    deadline = time.monotonic() + wait_s
    for name, socket in sockets.items():
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not socket.poll(remaining * 1000, zmq.POLLIN):
                raise TimeoutError(f"no subscriber on sensor {name} within {wait_s:.0f} s: is mmfuse-daemon running "
                                   f"with the same configuration{' and --virtual-clock' if virtual_clock else ''}?")
            if not virtual_clock or socket.recv() == b"\x01" + TICK_TOPIC:
                break
    return sockets


def format_decision(decision: dict, truth: str | None) -> str:
    window = decision["window"]
    mark = ""
    if truth is not None:
        mark = "  ok" if decision["label"] == truth else f"  (truth {truth})"
    score = decision["scores"].get(decision["label"], 0.0)
    extras = []
    if decision["restored"]:
        extras.append(f"restored={','.join(decision['restored'])}")
    if decision["dropped"]:
        extras.append(f"dropped={','.join(decision['dropped'])}")
    return (f"{decision['session']:>14} w{window['id']:<3} [{window['start']:6.1f},{window['end']:6.1f})  "
            f"{decision['label']:>9} {score:.2f}  present={','.join(decision['present'])} "
            f"{' '.join(extras)}  {decision['latency_ms']:.1f} ms{mark}")


def list_recording(path: str) -> int:
    from mmfuse.recording import RecordingError, summarize_mcap, summarize_xdf

    try:
        summaries = summarize_mcap(path) if path.endswith(".mcap") else summarize_xdf(path)
    except RecordingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: {len(summaries)} {'channel' if path.endswith('.mcap') else 'stream'}(s)")
    for summary in summaries:
        print("  " + summary.line())
    return 0


def load_schedule(args: argparse.Namespace) -> tuple[DaemonConfig, list, dict]:
    """Configuration, schedule and truth labels for whatever the arguments name."""
    from mmfuse.config import parse_config
    from mmfuse.recording import read_recording

    if args.recording and args.recording.endswith(".mcap"):
        recorded_config, messages = read_recording(args.recording)
        if args.config:
            config = load_config(args.config)
        elif recorded_config:
            config = parse_config(recorded_config, f"{args.recording} (recorded configuration)")
        else:
            raise ConfigError(f"{args.recording} carries no configuration: pass --config")
        known = {s.name for s in config.sensors}
        skipped = {m.sensor for m in messages} - known
        if skipped == {m.sensor for m in messages}:
            raise ConfigError(f"{args.recording}: its sensors ({', '.join(sorted(skipped))}) are none of the "
                              f"configuration's ({', '.join(sorted(known))}): leave --config out to use the one it "
                              f"was recorded with, or give one that names its sensors")
        if skipped:
            print(f"no configured sensor named {', '.join(sorted(skipped))}: their messages are skipped",
                  file=sys.stderr)
        return config, recording_schedule([m for m in messages if m.sensor in known]), {}
    config = load_config(args.config)
    if args.recording:
        return config, xdf_schedule(args.recording, config, args.map), {}
    schedule, truth = build_schedule(config, load_rows(args), args)
    return config, schedule, truth


def new_run(schedule: list[Scheduled]) -> tuple[int, set[str]]:
    """Stamp every message with a new run (its start time in ms, so runs increase): the daemon takes a replay of
    sessions it has seen before as a new life of them, with the same decisions as a fresh daemon would give.
    Returns the run and the sessions replayed."""
    run, sessions = time.time_ns() // 1_000_000, set()
    for item in schedule:
        body = msgpack.unpackb(item.frames[1], raw=False)
        if isinstance(body, dict):
            item.frames = [item.frames[0], msgpack.packb({**body, "run": run}, use_bin_type=True), *item.frames[2:]]
            sessions.add(body.get("session"))
    return run, sessions


def main(argv: list[str] | None = None) -> int:
    from mmfuse.recording import RecordingError

    args = parse_args(argv)
    if args.list:
        return list_recording(args.recording or args.data)
    from mmfuse.bundle import BundleError  # torch: after the arguments

    try:
        config, schedule, truth = load_schedule(args)
    except (ConfigError, DataError, BundleError, RecordingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        keys = client_keys(config, args.key)
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run, sessions = new_run(schedule)
    context = zmq.Context.instance()
    listener = context.socket(zmq.SUB)  # also without --listen: a replay the daemon rejected whole must say so
    listener.setsockopt(zmq.SUBSCRIBE, b"decision/")
    if keys is not None:
        connect_as(listener, keys.consumer, keys.server)
    handshakes = listener.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    listener.connect(config.output.endpoint)
    try:
        sockets = open_sockets(context, config, args.wait_s, args.virtual_clock, keys)
    except (TimeoutError, zmq.ZMQError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    source = args.recording or args.data
    if args.speed != 1 and not args.virtual_clock:
        print(f"warning: --speed {args.speed:g} without --virtual-clock: a daemon on the wall clock sees these "
              f"sensors' clocks run {args.speed:g} times fast and takes that for clock resets, so windows shift and "
              f"streams look dropped; start the daemon with --virtual-clock and replay with --virtual-clock for "
              f"faithful decisions at any speed", file=sys.stderr)
    if truth:
        print(f"replaying {len(truth)} utterances of {len({s for s, _ in truth})} session(s) from {source} "
              f"at speed {args.speed:g}",
              file=sys.stderr)
    else:
        print(f"replaying {len(schedule)} messages from {source} at speed {args.speed:g}", file=sys.stderr)

    received, correct = 0, 0

    def receive(timeout_s: float) -> None:
        nonlocal received, correct
        if listener.poll(min(max(0.0, timeout_s), 1.0) * 1000, zmq.POLLIN):  # (a pace's wait may be years)
            while True:
                try:
                    decision = wire.decode_decision(listener.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                except wire.WireError as exc:
                    print(f"skipped a malformed decision: {exc}", file=sys.stderr)
                    continue
                if decision["session"] not in sessions:
                    continue  # another source's
                label = truth.get((decision["session"], decision["window"]["id"]))
                received += 1
                correct += label is not None and decision["label"] == label
                if args.listen:
                    print(format_decision(decision, label), flush=True)

    items = sorted(schedule)
    gap, at = max(((b.due - a.due, a.due) for a, b in zip(items, items[1:])), default=(0.0, 0.0))
    if gap / args.speed > LONG_GAP_S:
        print(f"warning: {source} has a gap of {gap:g} s after receive time {at:g}: at speed {args.speed:g} the "
              f"replay waits {gap / args.speed:g} s there; --speed max with --virtual-clock does not wait",
              file=sys.stderr)
    first, start = (items[0].due if items else 0.0), time.monotonic()

    def pace(due: float) -> None:
        while (wait := start + (due - first) / args.speed - time.monotonic()) > 0:
            receive(wait)

    if args.virtual_clock:
        for item in replay_ticks([i.due for i in items], *replay_times(config)):
            if isinstance(item, Tick):
                pace(item.now)
                for socket in sockets.values():
                    socket.send_multipart(tick_frames(item))
            else:
                scheduled = items[item]
                sockets[scheduled.sensor].send_multipart(scheduled.frames + [wire.receive_time_frame(scheduled.due)])
    else:
        for item in items:
            pace(item.due)
            sockets[item.sensor].send_multipart(item.frames)
    quiet_until = time.monotonic() + config.drop.timeout_s + 3.0
    while time.monotonic() < quiet_until and (received < len(truth) or not truth) and (args.listen or not received):
        receive(0.2)
    if args.listen:
        labelled = any(v is not None for v in truth.values())
        accuracy = f", accuracy {correct / received:.3f}" if received and labelled else ""
        print(f"{received} decision(s)" + (f" for {len(truth)} utterance(s){accuracy}" if truth else ""),
              file=sys.stderr)
    for socket in sockets.values():
        socket.close()
    if not received and schedule and handshakes.poll(0):
        print(f"error: the daemon published no decision for the {len(sessions)} session(s) of this replay (run "
              f"{run}): it rejected or dropped every message. Its log says why ('malformed message rejected'): "
              f"a configuration or bundle that does not fit the data?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
