"""Session recordings in MCAP (what mmfuse-record writes and mmfuse-replay reads), and
the inventory of foreign MCAP and XDF files.

Layout of an mmfuse recording: profile `mmfuse`; one channel per source, topic
`<modality>/<source>`, message encoding `msgpack`, no schema, channel metadata
`modality`, `source`, `sensor` (the configured sensor whose socket received it); each
message is the original payload bytes of one wire-protocol v1 message, log time =
receive time on the recorder's clock, publish time = origin time `t`, sequence = `seq`.
Decisions, when recorded, go to channel `decision`. Metadata record `mmfuse` holds the
daemon configuration the recorder ran with; `mmfuse-counts` what it rejected;
`mmfuse-clocks` each stream's clock against the recorder's as the daemon learns it
(mmfuse.clocks: offset at the stream's last message, drift, resets). Channel `clock`
(JSON) has an entry each time a stream's clock is first learned or reset.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import structlog

import mmfuse
from mmfuse import wire
from mmfuse.clocks import ClockTracker

PROFILE = "mmfuse"
ENCODING = "msgpack"
DECISION_TOPIC = "decision"
CLOCK_TOPIC = "clock"
GAP_FACTOR = 5.0  # a pause longer than this many median intervals is reported as a gap


class RecordingError(Exception):
    """A recording that cannot be used; the message says why and what it holds."""


UINT64_MAX = 2**64 - 1


def seconds_to_ns(t: float) -> int:
    """MCAP times are uint64 nanoseconds; the wire allows any finite t, so clamp (the payload keeps t)."""
    return int(min(max(t * 1e9, 0.0), UINT64_MAX))


class RecordingWriter:
    """Writes received sensor messages (and decisions) into an MCAP file as they arrive."""

    def __init__(self, path: str | Path, config: dict):
        from mcap.writer import Writer

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "wb")
        self.writer = Writer(self.handle)
        self.writer.start(profile=PROFILE, library=f"mmfuse {mmfuse.__version__}")
        self.writer.add_metadata("mmfuse", {"config": json.dumps(config), "mmfuse_version": mmfuse.__version__,
                                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.channels: dict[str, int] = {}
        self.clocks: dict[tuple[str, str], ClockTracker] = {}  # learned as the daemon's sensor actors do
        self.last_seq: dict[tuple[str, str], int] = {}
        self.jump_s = config.get("clock", {}).get("jump_s", 1.0)
        self.messages = 0

    def _channel(self, topic: str, metadata: dict[str, str], encoding: str = ENCODING) -> int:
        if topic not in self.channels:
            self.channels[topic] = self.writer.register_channel(topic, encoding, 0, metadata)
        return self.channels[topic]

    def sensor_message(self, sensor: str, message: wire.SensorMessage, payload: bytes, received: float) -> None:
        channel = self._channel(f"{message.modality}/{message.source}",
                                {"modality": message.modality, "source": message.source, "sensor": sensor})
        self.writer.add_message(channel, seconds_to_ns(received), payload, seconds_to_ns(message.t),
                                message.seq & 0xFFFFFFFF)  # MCAP's sequence is uint32; the payload keeps seq
        self.messages += 1
        key = (message.session, message.source)
        last = self.last_seq.get(key, -1)
        restarted = message.seq == 0 and last > 0
        if message.seq <= last and not restarted:  # a duplicate or reordered message: the daemon skips it
            return
        self.last_seq[key] = message.seq
        clock = self.clocks.setdefault(key, ClockTracker(self.jump_s))
        known = clock.line is not None
        jump = clock.observe(message.t + message.duration, received, restarted)
        if jump is not None or (clock.line is not None and not known):
            entry = {"session": message.session, "source": message.source, **clock.estimate(),
                     **({"reset_jump_s": jump.jump_s} if jump else {})}
            self.writer.add_message(self._channel(CLOCK_TOPIC, {}, "json"), seconds_to_ns(received),
                                    json.dumps(entry).encode(), seconds_to_ns(received))

    def decision(self, payload: bytes, received: float) -> None:
        self.writer.add_message(self._channel(DECISION_TOPIC, {}), seconds_to_ns(received), payload,
                                seconds_to_ns(received))

    def flush(self) -> None:
        """Put what was written so far in the file as a finished chunk: a recorder killed later loses only
        what came since (mmfuse-replay reads a file that ends early up to where it ends)."""
        self.writer.flush()

    def close(self, counts: dict[str, int]) -> None:
        self.writer.add_metadata("mmfuse-counts", {k: str(v) for k, v in counts.items()})
        self.writer.add_metadata("mmfuse-clocks", {f"{session}/{source}": json.dumps(clock.estimate())
                                                   for (session, source), clock in self.clocks.items()})
        self.writer.finish()
        self.handle.close()


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    sensor: str
    topic: bytes          # the ZeroMQ topic to publish it under
    payload: bytes
    received: float       # log time, seconds
    reached: float        # origin time + duration: what the message delivers up to, on the sensor's clock


def _reader(handle, path: Path):
    """An MCAP reader of the file and its summary, checking every chunk's CRC as it is read (a damaged chunk is an
    error, never data); a file without a readable summary (cut off, or its end damaged) is read record by record."""
    from mcap.reader import make_reader

    try:
        reader = make_reader(handle, validate_crcs=True)
        summary = reader.get_summary()
        if summary is not None:
            return reader, summary
        problem = "it has no summary section"
    except Exception as exc:  # the mcap library's own errors on damaged data are of many types
        problem = _described(exc)
    salvaged = _Salvaged(path)
    if not salvaged.summary.channels:
        raise RecordingError(f"{path}: not a readable MCAP file ({problem}): not MCAP, or cut off before its "
                             f"first channel")
    if salvaged.cut is not None:  # (an MCAP file may end without a summary: only a cut one is news)
        structlog.get_logger().warning("recording cut off or its end damaged (its recorder was killed?): read up "
                                       "to where it ends", recording=str(path), messages=len(salvaged.messages),
                                       cut=salvaged.cut)
    return salvaged, salvaged.summary


class _Salvaged:
    """What an MCAP file without a summary holds (one whose writer was killed: up to where it was cut), read
    record by record, with the reader methods read_recording and summarize_mcap use."""

    def __init__(self, path: Path):
        from mcap.records import Channel, Message, Metadata, Schema
        from mcap.stream_reader import CRCValidationError, StreamReader
        from mcap.summary import Summary

        self.summary, self.metadata, self.messages = Summary(), [], []
        self.cut: str | None = None  # why reading stopped before the file's proper end
        with open(path, "rb") as handle:
            try:
                for record in StreamReader(handle, validate_crcs=True).records:
                    if isinstance(record, Channel):
                        self.summary.channels[record.id] = record
                    elif isinstance(record, Schema):
                        self.summary.schemas[record.id] = record
                    elif isinstance(record, Metadata):
                        self.metadata.append(record)
                    elif isinstance(record, Message) and record.channel_id in self.summary.channels:
                        self.messages.append(record)
            except CRCValidationError as exc:  # a chunk written whole, then changed: not a cut
                raise RecordingError(f"{path}: the MCAP file is damaged ({_described(exc)})") from None
            except Exception as exc:  # (where the file was cut: any of the library's errors)
                self.cut = _described(exc)
        self.messages.sort(key=lambda m: m.log_time)

    def iter_metadata(self):
        return iter(self.metadata)

    def iter_messages(self, topics: list[str] | None = None):
        for message in self.messages:
            channel = self.summary.channels[message.channel_id]
            if topics is None or channel.topic in topics:
                yield self.summary.schemas.get(channel.schema_id), channel, message


def _described(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def mmfuse_channels(summary) -> tuple[dict[int, object], list[str]]:
    """Channels an mmfuse replay can use, and a description of every other one."""
    usable, foreign = {}, []
    counts = summary.statistics.channel_message_counts if summary.statistics else {}
    for channel_id, channel in summary.channels.items():
        modality = channel.metadata.get("modality")
        schema = summary.schemas.get(channel.schema_id)
        if _schema_missing(channel, summary):
            foreign.append(f"{channel.topic} ({_schema_missing(channel, summary)})")
        elif channel.message_encoding == ENCODING and modality in mmfuse.MODALITIES and "sensor" in channel.metadata:
            usable[channel_id] = channel
        elif channel.topic not in (DECISION_TOPIC, CLOCK_TOPIC):
            foreign.append(f"{channel.topic} ({channel.message_encoding}"
                           f"{', ' + schema.name if schema else ''}, {counts.get(channel_id, 0)} messages)")
    return usable, foreign


def _schema_missing(channel, summary) -> str | None:
    """Why a channel's messages cannot be read, if it names a schema the file does not hold."""
    if channel.schema_id and channel.schema_id not in summary.schemas:
        return f"names schema {channel.schema_id}, which the file does not hold: damaged"
    return None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"{path}: {'a directory, not a recording' if path.is_dir() else 'no such file'}")
    return path


def read_recording(path: str | Path) -> tuple[dict, list[RecordedMessage]]:
    """The configuration an mmfuse recording was made with, and its sensor messages in log-time order."""
    path = _existing(path)
    with open(path, "rb") as handle:
        reader, summary = _reader(handle, path)
        usable, foreign = mmfuse_channels(summary)
        if not usable:
            raise RecordingError(f"{path} holds no mmfuse channels (msgpack wire-protocol messages with a modality); "
                                 f"channels it cannot use: {', '.join(foreign) or 'none'}")
        try:
            config = _recorded_config(reader, path)
            messages, skipped = [], 0
            for _, channel, message in reader.iter_messages(topics=[c.topic for c in usable.values()]):
                recorded = _recorded_message(channel, message)
                if recorded is None:
                    skipped += 1
                else:
                    messages.append(recorded)
        except RecordingError:
            raise
        except Exception as exc:  # the mcap library's own errors on damaged data are of many types
            raise RecordingError(f"{path}: the MCAP file is damaged ({_described(exc)})") from None
    if skipped and not messages:
        raise RecordingError(f"{path}: none of its {skipped} messages is an mmfuse sensor message (a msgpack map "
                             f"with a session and finite times); the file is damaged or was not made by mmfuse")
    if skipped:
        structlog.get_logger().warning("recorded messages skipped: not mmfuse sensor messages", recording=str(path),
                                       count=skipped, kept=len(messages))
    return config, messages


def _recorded_config(reader, path: Path) -> dict:
    """The configuration in the recording's `mmfuse` metadata ({} when there is none)."""
    config = {}
    for record in reader.iter_metadata():
        if record.name == "mmfuse":
            try:
                config = json.loads(record.metadata.get("config", "{}"))
            except ValueError:
                config = None
            if not isinstance(config, dict):
                raise RecordingError(f"{path}: its mmfuse metadata holds no configuration (not a JSON mapping); "
                                     f"the file is damaged")
    return config


def _recorded_message(channel, message) -> RecordedMessage | None:
    """A recorded sensor message as replayed (its bytes as recorded), or None when its payload is not a map with
    a session and finite times: no sensor message, so a damaged or foreign file."""
    try:
        body = msgpack.unpackb(message.data, raw=False)
    except Exception:  # (msgpack raises several unrelated types for bad input)
        return None
    if not isinstance(body, dict) or not isinstance(body.get("session"), str):
        return None
    t, duration = body.get("t", 0.0), body.get("duration", 0.0)
    if not all(type(v) in (int, float) and np.isfinite(v) for v in (t, duration)):
        return None
    return RecordedMessage(channel.metadata["sensor"], f"{channel.metadata['modality']}/{body['session']}".encode(),
                           message.data, message.log_time / 1e9, float(t) + float(duration))


@dataclass
class StreamSummary:
    name: str
    kind: str                 # what the stream carries (modality, XDF type, MCAP encoding)
    count: int
    start: float | None
    end: float | None
    gaps: list[tuple[float, float]]       # (at, length) in seconds
    resets: list[tuple[float, float]]     # (at, jump) in seconds
    offsets: str = ""

    def line(self) -> str:
        span = "empty" if self.count == 0 else f"{self.start:.3f} .. {self.end:.3f} s ({self.end - self.start:.1f} s)"
        parts = [f"{self.name} [{self.kind}]: {self.count} messages, {span}"]
        if self.offsets:
            parts.append(f"clock offsets {self.offsets}")
        if self.gaps:
            parts.append("gaps " + ", ".join(f"{length:.1f} s at {at:.1f}" for at, length in self.gaps[:5])
                         + (f" (+{len(self.gaps) - 5} more)" if len(self.gaps) > 5 else ""))
        if self.resets:
            parts.append("clock resets " + ", ".join(f"offset {jump:+.1f} s at {at:.1f}" for at, jump in self.resets))
        return "; ".join(parts)


def gaps_and_resets(times: np.ndarray, nominal_rate: float = 0.0) -> tuple[list, list]:
    """Pauses much longer than the usual interval, and jumps backwards, in a time-stamp series."""
    if len(times) < 2:
        return [], []
    steps = np.diff(times)
    usual = 1.0 / nominal_rate if nominal_rate > 0 else _usual_step(steps[steps > 0])
    gaps = [(float(times[i]), float(steps[i])) for i in np.flatnonzero(steps > max(GAP_FACTOR * usual, 1e-3))]
    resets = [(float(times[i]), float(steps[i])) for i in np.flatnonzero(steps < -max(usual, 1e-3))]
    return gaps, resets


def _usual_step(steps: np.ndarray) -> float:
    """A series' usual interval: its median step, or, where messages come in bursts (steps near 0 pull the median
    down), the mean of its steps but the longest tenth, whichever is longer."""
    if not len(steps):
        return 0.0
    return float(max(np.median(steps), steps[steps <= np.percentile(steps, 90)].mean()))


def clock_offsets(delays: np.ndarray) -> str:
    """Receive clock - sensor clock (receive time - origin time `t`): the lowest delay, as NTP and LSL
    estimate it, at the start and the end of the recording; their difference is the drift plus any
    clock change. A message's span (`duration`) is part of its delay."""
    if len(delays) < 2:
        return ""
    tenth = max(1, len(delays) // 10)
    first, last = float(delays[:tenth].min()), float(delays[-tenth:].min())
    return f"{first:+.4f} s at the start, {last:+.4f} s at the end ({last - first:+.4f} s)"


def summarize_mcap(path: str | Path) -> list[StreamSummary]:
    path = _existing(path)
    with open(path, "rb") as handle:
        reader, summary = _reader(handle, path)
        times: dict[int, list[float]] = {}
        origins: dict[int, list[float]] = {}
        readable = [c.topic for c in summary.channels.values() if not _schema_missing(c, summary)]
        try:
            for _, channel, message in reader.iter_messages(topics=readable):
                times.setdefault(channel.id, []).append(message.log_time / 1e9)
                origins.setdefault(channel.id, []).append(message.publish_time / 1e9)
        except Exception as exc:  # (as in read_recording)
            raise RecordingError(f"{path}: the MCAP file is damaged ({_described(exc)})") from None
    result = []
    usable, _ = mmfuse_channels(summary)
    for channel_id, channel in summary.channels.items():
        series = np.sort(np.array(times.get(channel_id, [])))
        schema = summary.schemas.get(channel.schema_id)
        if channel_id in usable:
            kind = channel.metadata["modality"]
        elif _schema_missing(channel, summary):
            kind = _schema_missing(channel, summary)
        elif channel.topic == DECISION_TOPIC and channel.message_encoding == ENCODING:
            kind = "decisions"
        elif channel.topic == CLOCK_TOPIC and channel.message_encoding == "json":
            kind = "clock estimates"
        else:
            kind = f"{channel.message_encoding}{', ' + schema.name if schema else ''}; not usable by mmfuse"
        gaps, _ = gaps_and_resets(series)
        resets, offsets = [], ""
        if channel_id in usable:  # origin times in receive order: a jump back is a sensor clock reset
            origin = np.array(origins[channel_id]) if channel_id in origins else np.zeros(0)
            resets = gaps_and_resets(origin)[1]
            offsets = clock_offsets(series - origin)
        result.append(StreamSummary(channel.topic, kind, len(series), float(series[0]) if len(series) else None,
                                    float(series[-1]) if len(series) else None, gaps, resets, offsets))
    return result


def summarize_xdf(path: str | Path) -> list[StreamSummary]:
    """Streams of an XDF file with pyxdf's clock-offset correction, gaps and clock resets."""
    import pyxdf

    try:
        streams, _ = pyxdf.load_xdf(str(path), synchronize_clocks=True, handle_clock_resets=True, dejitter_timestamps=False)
    except Exception as exc:  # pyxdf raises assorted errors on damaged files
        raise RecordingError(f"{path}: not a readable XDF file ({exc})") from None
    result = []
    for stream in streams:
        info = stream["info"]
        times = np.asarray(stream["time_stamps"], dtype=float)
        rate = float(info["nominal_srate"][0])
        gaps, _ = gaps_and_resets(times, rate)
        resets = []
        offsets = np.asarray(stream["clock_values"], dtype=float)
        offset_text = (f"{len(offsets)} measured, {offsets.min():+.4f} .. {offsets.max():+.4f} s" if len(offsets)
                       else "none measured")
        if len(offsets):
            jumps = np.abs(np.diff(offsets))
            resets = [(float(stream["clock_times"][i + 1]), float(offsets[i + 1] - offsets[i]))
                       for i in np.flatnonzero(jumps > 1.0)]
        result.append(StreamSummary(info["name"][0], f"{info['type'][0]}, {info['channel_count'][0]} ch "
                                    f"{info['channel_format'][0]} @ {rate:g} Hz", len(times),
                                    float(times[0]) if len(times) else None, float(times[-1]) if len(times) else None,
                                    gaps, resets, offset_text))
    return result
