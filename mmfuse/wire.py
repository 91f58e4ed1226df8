"""Wire protocol v1 (docs/protocol.md): the one encoder, decoder and validator.

Sensors, the daemon, replay, benchmarks and tests all go through this module.
Arrays travel as raw bytes + numpy dtype string + shape, never pickled.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgpack
import msgspec
import numpy as np

from mmfuse import MAX_NAME_LEN, MODALITIES

VERSION = 1
KINDS = ("data", "heartbeat", "end")
ENCODINGS = ("features", "pcm16", "jpeg", "rgb8", "utf8")
FEATURE_DTYPES = ("<f4", "<f8", "<f2")
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
MAX_TIME_S = 1e12       # |t|: about 31,700 years of seconds; epoch milli- or nanoseconds are far beyond
MAX_DURATION_S = 86_400.0


class WireError(ValueError):
    """A payload that does not follow protocol v1.

    `reason` is a short stable code (used as a counter name); the message says more.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class SensorMessage:
    """One decoded sensor message. Treat it as immutable (change a copy: dataclasses.replace); it is not frozen
    because a frozen dataclass costs 4 us more to build, a tenth of the daemon's whole per-message budget."""
    session: str
    source: str
    modality: str
    seq: int
    t: float
    kind: str = "data"
    encoding: str | None = None
    data: bytes | str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    rate: int | None = None
    duration: float = 0.0
    run: int = 0  # which run of its session the stream is in: a replay starts a new one each time

    @property
    def topic(self) -> str:
        return f"{self.modality}/{self.session}"

    def array(self) -> np.ndarray:
        """The payload of a `features` or `rgb8` message as a read-only numpy view."""
        if self.encoding not in ("features", "rgb8"):
            raise WireError("bad_encoding", f"{self.encoding} carries no array")
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class Decision:
    session: str
    window_id: int
    start: float
    end: float
    task: str
    label: str
    scores: dict[str, float]
    present: list[str]
    restored: list[str]
    dropped: list[str]
    restorer: str
    latency_ms: float
    bundle: str
    closed_at: float = 0.0  # the aligner's clock when it closed the window; not on the wire
    dispatched_at: float = 0.0  # wall time the aligner actor handed the window on; not on the wire
    spread: float | None = None  # restoration_spread on the wire, when sampled K > 1 times
    abstain: bool = False
    restoration_failed: bool = False
    revision: int = 0       # > 0: a corrected decision for a window decided before
    seq_gaps: dict[str, int] = field(default_factory=dict)  # modality -> messages its streams lost around the window
    late: dict[str, int] = field(default_factory=dict)      # a revision: modality -> late messages it took in
    key: tuple = ()         # the window's identity (mmfuse.frames.WindowKey); not on the wire

    @property
    def topic(self) -> str:
        return f"decision/{self.session}"


def features_message(session: str, source: str, modality: str, seq: int, t: float,
                     vector: np.ndarray, duration: float = 0.0) -> SensorMessage:
    array = np.ascontiguousarray(vector, dtype="<f4")
    return SensorMessage(session=session, source=source, modality=modality, seq=seq, t=t,
                         kind="data", encoding="features", data=array.tobytes(),
                         shape=tuple(array.shape), dtype="<f4", duration=duration)


def rgb8_message(session: str, source: str, seq: int, t: float, image: np.ndarray,
                 duration: float = 0.0) -> SensorMessage:
    array = np.ascontiguousarray(image, dtype=np.uint8)
    return SensorMessage(session=session, source=source, modality="visual", seq=seq, t=t, encoding="rgb8",
                         data=array.tobytes(), shape=tuple(array.shape), dtype="|u1", duration=duration)


def jpeg_message(session: str, source: str, seq: int, t: float, jpeg: bytes, duration: float = 0.0) -> SensorMessage:
    return SensorMessage(session=session, source=source, modality="visual", seq=seq, t=t, encoding="jpeg",
                         data=jpeg, duration=duration)


def pcm16_message(session: str, source: str, seq: int, t: float, samples: np.ndarray, rate: int) -> SensorMessage:
    """Audio from float samples in [-1, 1]; the message covers len(samples) / rate seconds."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    return SensorMessage(session=session, source=source, modality="audio", seq=seq, t=t, encoding="pcm16",
                         data=pcm.tobytes(), rate=rate, duration=len(pcm) / rate)


def text_message(session: str, source: str, seq: int, t: float, text: str, duration: float) -> SensorMessage:
    return SensorMessage(session=session, source=source, modality="text", seq=seq, t=t, encoding="utf8",
                         data=text, duration=duration)


def encode(message: SensorMessage) -> list[bytes]:
    """Multipart frames `[topic, payload]` for a sensor message."""
    payload = {"v": VERSION, "session": message.session, "source": message.source,
               "modality": message.modality, "seq": message.seq, "t": float(message.t),
               "kind": message.kind}
    if message.run:
        payload["run"] = message.run
    if message.kind == "data":
        payload["encoding"] = message.encoding
        payload["data"] = message.data
        payload["duration"] = float(message.duration)
        if message.encoding in ("features", "rgb8"):
            payload["shape"] = list(message.shape)
            payload["dtype"] = message.dtype
        if message.encoding == "pcm16":
            payload["rate"] = message.rate
    return [message.topic.encode(), msgpack.packb(payload, use_bin_type=True)]


def decode(frames: list[bytes], max_payload: int = DEFAULT_MAX_PAYLOAD) -> SensorMessage:
    """Decode and validate one multipart sensor message; raises WireError."""
    if len(frames) != 2:
        raise WireError("frames", f"expected [topic, payload], got {len(frames)} frame(s)")
    topic, payload = frames
    if len(payload) > max_payload:
        raise WireError("oversized", f"payload of {len(payload)} bytes exceeds {max_payload}")
    return _well_formed(topic, payload) or _checked(topic, payload)


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LEN)]


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    """The map of a message as `_well_formed` takes it, typed for msgspec's compiled decoder. Unknown keys are
    refused: msgpack with strict map keys refuses a map key that is no string even inside them, msgspec skips them
    unread."""
    v: int
    session: _Name
    source: _Name
    modality: Literal[MODALITIES]
    kind: Literal[KINDS]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    t: Annotated[float, msgspec.Meta(ge=-MAX_TIME_S, le=MAX_TIME_S)]
    run: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    encoding: Literal[ENCODINGS] | None = None
    duration: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DURATION_S)] = 0.0
    data: msgspec.Raw = msgspec.Raw()  # left encoded: see _data
    shape: list[int] | None = None
    dtype: str | None = None
    rate: int | None = None


_BODY = msgspec.msgpack.Decoder(_Body)
_BIN = frozenset((0xc4, 0xc5, 0xc6))  # msgpack's first bytes of bin and str
_STR = frozenset((*range(0xa0, 0xc0), 0xd9, 0xda, 0xdb))
_DOUBTFUL = object()


def _data(raw: msgspec.Raw) -> bytes | str | None | object:
    """A message's `data`: bytes, a string, None (nil or absent), or _DOUBTFUL for anything else (a map with a key
    that is no string, which `_checked` refuses), left to `_checked`."""
    view = memoryview(raw)
    if not view or view[0] == 0xc0:
        return None
    if view[0] in _BIN:
        return msgspec.msgpack.decode(raw, type=bytes)
    if view[0] in _STR:
        return msgspec.msgpack.decode(raw, type=str)
    return _DOUBTFUL


def _well_formed(topic: bytes, payload: bytes) -> SensorMessage | None:
    """The message, if the payload is one that `_checked` accepts, decoded in compiled code (msgspec: a tenth of
    the time); None for anything else, which `_checked` then decodes key by key and names what is wrong with."""
    try:
        body = _BODY.decode(payload)
        data = _data(body.data)
    except (msgspec.MsgspecError, RecursionError):  # (msgspec recurses even to skip a value nested deep)
        return None
    if data is _DOUBTFUL or body.v != VERSION or "/" in body.session or "/" in body.source \
            or topic != f"{body.modality}/{body.session}".encode():
        return None
    if body.kind != "data":
        return SensorMessage(body.session, body.source, body.modality, body.seq, body.t, body.kind, run=body.run)
    encoding = body.encoding
    if encoding == "utf8":
        if type(data) is not str:
            return None
        return SensorMessage(body.session, body.source, body.modality, body.seq, body.t, encoding=encoding,
                             data=data, duration=body.duration, run=body.run)
    if encoding is None or type(data) is not bytes:
        return None
    shape = dtype = rate = None
    if encoding in ("features", "rgb8"):
        try:
            shape, dtype = _array_header(body.shape, body.dtype, encoding, len(data))
        except WireError:
            return None
    elif encoding == "pcm16":
        rate = body.rate
        if type(rate) is not int or not 0 < rate <= 384_000 or len(data) % 2:
            return None
    return SensorMessage(body.session, body.source, body.modality, body.seq, body.t, encoding=encoding, data=data,
                         shape=shape, dtype=dtype, rate=rate, duration=body.duration, run=body.run)


def _checked(topic: bytes, payload: bytes) -> SensorMessage:
    """Decode key by key, with the reason for the first thing wrong; raises WireError."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError("msgpack", f"payload is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(body, dict):
        raise WireError("not_a_map", f"payload is a msgpack {type(body).__name__}, not a map")
    version = body.get("v")
    if type(version) is not int or version != VERSION:  # True == 1.0 == 1 in Python; the protocol says integer 1
        raise WireError("version", f"unsupported protocol version {version!r} (this daemon speaks {VERSION})")

    session = _text(body, "session")
    source = _text(body, "source")
    modality = body.get("modality")
    if type(modality) is not str or modality not in _MODALITIES:
        modality = _choice(body, "modality", MODALITIES)
    kind = body.get("kind")
    if type(kind) is not str or kind not in _KINDS:
        kind = _choice(body, "kind", KINDS)
    seq = body.get("seq")
    if type(seq) is not int or seq < 0:
        raise WireError("bad_type:seq", f"seq must be a non-negative integer, got {seq!r}")
    t = body.get("t")
    if type(t) is not float or not -MAX_TIME_S <= t <= MAX_TIME_S:  # (NaN fails the comparison too)
        t = _number(body, "t")
    if abs(t) > MAX_TIME_S:
        raise WireError("bad_value:t", f"t must be in seconds, at most {MAX_TIME_S:g} in size, got {t!r} "
                        "(milliseconds or nanoseconds?)")
    run = body.get("run", 0)
    if type(run) is not int or not 0 <= run < 2**63:
        raise WireError("bad_type:run", f"run must be a non-negative integer, got {run!r:.40}")
    expected_topic = f"{modality}/{session}"
    if topic != expected_topic.encode():
        raise WireError("topic", f"topic {topic[:80]!r} does not match payload ({expected_topic!r})")
    if kind != "data":
        return SensorMessage(session=session, source=source, modality=modality, seq=seq, t=t, kind=kind, run=run)

    encoding = body.get("encoding")
    if type(encoding) is not str or encoding not in _ENCODINGS:
        encoding = _choice(body, "encoding", ENCODINGS)
    duration = body.get("duration", 0.0)
    if type(duration) is not float or not 0 <= duration <= MAX_DURATION_S:
        duration = _number(body, "duration")
    if not 0 <= duration <= MAX_DURATION_S:
        raise WireError("bad_value:duration", f"duration must be between 0 and {MAX_DURATION_S:g} s, got {duration}")
    data = body.get("data")
    if encoding == "utf8":
        if not isinstance(data, str):
            raise WireError("bad_type:data", "utf8 data must be a msgpack str")
        return SensorMessage(session=session, source=source, modality=modality, seq=seq, t=t,
                             encoding=encoding, data=data, duration=duration, run=run)
    if not isinstance(data, bytes):
        raise WireError("bad_type:data", f"{encoding} data must be msgpack bin, got {type(data).__name__}")

    shape = dtype = rate = None
    if encoding in ("features", "rgb8"):
        shape, dtype = _array_header(body.get("shape"), body.get("dtype"), encoding, len(data))
    elif encoding == "pcm16":
        rate = body.get("rate")
        if type(rate) is not int or not 0 < rate <= 384_000:
            raise WireError("bad_type:rate", f"pcm16 needs an integer rate in Hz, got {rate!r}")
        if len(data) % 2:
            raise WireError("shape", "pcm16 data has an odd number of bytes")
    return SensorMessage(session=session, source=source, modality=modality, seq=seq, t=t,
                         encoding=encoding, data=data, shape=shape, dtype=dtype, rate=rate,
                         duration=duration, run=run)


_MODALITIES, _KINDS, _ENCODINGS = frozenset(MODALITIES), frozenset(KINDS), frozenset(ENCODINGS)
_ITEMSIZE = {dtype: np.dtype(dtype).itemsize for dtype in (*FEATURE_DTYPES, "|u1")}


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if type(value) is str and value and len(value) <= MAX_NAME_LEN and "/" not in value:
        return value
    if key not in body:
        raise WireError(f"missing:{key}", f"required key {key!r} is missing")
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN or "/" in value:
        raise WireError(f"bad_type:{key}", f"{key} must be a non-empty string without '/', got {value!r:.80}")
    return value


def _choice(body: dict, key: str, allowed: tuple[str, ...]) -> str:
    if key not in body:
        raise WireError(f"missing:{key}", f"required key {key!r} is missing")
    value = body[key]
    if value not in allowed:
        raise WireError(f"bad_value:{key}", f"{key} must be one of {', '.join(allowed)}; got {value!r:.80}")
    return value


def _number(body: dict, key: str) -> float:
    if key not in body:
        raise WireError(f"missing:{key}", f"required key {key!r} is missing")
    value = body[key]
    if type(value) not in (int, float) or not math.isfinite(value):
        raise WireError(f"bad_type:{key}", f"{key} must be a finite number, got {value!r:.80}")
    return float(value)


def _array_header(shape, dtype, encoding: str, nbytes: int) -> tuple[tuple[int, ...], str]:
    if type(shape) is not list or not shape or not all(type(n) is int and n > 0 for n in shape):
        raise WireError("bad_type:shape", f"shape must be a list of positive integers, got {shape!r:.80}")
    if encoding == "features":
        if dtype not in FEATURE_DTYPES:
            raise WireError("bad_value:dtype", f"features dtype must be one of {FEATURE_DTYPES}, got {dtype!r:.40}")
        if len(shape) > 2:
            raise WireError("shape", f"features must be [dim] or [frames, dim], got {shape}")
    else:
        if dtype != "|u1":
            raise WireError("bad_value:dtype", f"rgb8 dtype must be '|u1', got {dtype!r:.40}")
        if len(shape) != 3 or shape[2] != 3:
            raise WireError("shape", f"rgb8 shape must be [height, width, 3], got {shape}")
    expected = math.prod(shape) * _ITEMSIZE[dtype]  # exact: numpy's product wraps around at 2**63
    if expected != nbytes:
        raise WireError("shape", f"shape {shape} of {dtype} needs {expected} bytes, data has {nbytes}")
    return tuple(shape), dtype


def encode_decision(decision: Decision, payload: dict | None = None) -> list[bytes]:
    """[topic, msgpack payload]; `payload`: decision_payload(decision), when the caller has it already."""
    return [decision.topic.encode(), msgpack.packb(payload or decision_payload(decision), use_bin_type=True)]


def decision_payload(decision: Decision) -> dict:
    """The map a decision carries on the wire (what decode_decision gives a consumer)."""
    payload = {"v": VERSION, "session": decision.session,
               "window": {"id": decision.window_id, "start": decision.start, "end": decision.end,
                          "revision": decision.revision},
               "task": decision.task, "label": decision.label, "scores": decision.scores,
               "present": decision.present, "restored": decision.restored, "dropped": decision.dropped,
               "restorer": decision.restorer, "latency_ms": decision.latency_ms, "bundle": decision.bundle}
    if decision.spread is not None:
        payload["restoration_spread"] = decision.spread
    if decision.abstain:
        payload["abstain"] = True
    if decision.restoration_failed:
        payload["restoration_failed"] = True
    if decision.seq_gaps:
        payload["seq_gaps"] = decision.seq_gaps
    if decision.late:
        payload["late"] = decision.late
    return payload


def connect_address(endpoint: str, node_ip: str) -> str:
    """The endpoint peers on other machines connect to, for one bound on the node with address `node_ip`: a
    wildcard host (tcp://*:PORT, tcp://0.0.0.0:PORT) is that node's address."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{node_ip}:{endpoint.removeprefix(wildcard)}"
    return endpoint


OUTCOMES = ("complete", "restored", "abstain", "restoration_failed", "revised")


def decision_outcome(payload: dict) -> str:
    """What became of a decided window, one of OUTCOMES: a revision, else restoration failed, else abstained,
    else restored (something was missing and filled), else complete."""
    if payload["window"]["revision"]:
        return "revised"
    if payload.get("restoration_failed"):
        return "restoration_failed"
    if payload.get("abstain"):
        return "abstain"
    return "restored" if payload["restored"] else "complete"


class _DecisionWindow(msgspec.Struct):
    id: int
    start: float
    end: float
    revision: Annotated[int, msgspec.Meta(ge=0)]


class _DecisionBody(msgspec.Struct):
    """The keys every v1 decision has (docs/protocol.md), typed: a consumer can read them without checking. Keys
    it does not name are left as they are (later versions add keys)."""
    session: str
    window: _DecisionWindow
    label: str
    scores: Annotated[dict[str, float], msgspec.Meta(min_length=1)]
    present: list[str]
    restored: list[str]
    dropped: list[str]
    latency_ms: float


def decode_decision(frames: list[bytes]) -> dict:
    """Decode a decision for a downstream consumer (returns the plain map), checked against the protocol's keys:
    a map without them, or with a value of another type, is a WireError."""
    if len(frames) != 2:
        raise WireError("frames", f"expected [topic, payload], got {len(frames)} frame(s)")
    try:
        body = msgpack.unpackb(frames[1], raw=False)
    except Exception as exc:
        raise WireError("msgpack", f"decision payload is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise WireError("version", "not a v1 decision")
    try:
        msgspec.convert(body, _DecisionBody)
    except msgspec.ValidationError as exc:
        raise WireError("decision", f"not a decision as docs/protocol.md gives it ({exc})") from None
    return body


_RECEIVE_TIME = struct.Struct("<d")


def receive_time_frame(t: float) -> bytes:
    """A receive time as a frame of its own (a virtual-clock message's third frame, an accepted message's fourth)."""
    return _RECEIVE_TIME.pack(t)


def receive_time(frame: bytes) -> float | None:
    """The time in a `receive_time_frame`; None for a frame that is not one or a time that is no plausible
    seconds."""
    if len(frame) != _RECEIVE_TIME.size:
        return None
    (t,) = _RECEIVE_TIME.unpack(frame)
    return t if math.isfinite(t) and abs(t) <= MAX_TIME_S else None


def encode_accepted(sensor: str, topic: bytes, payload: bytes, arrived_at: float) -> list[bytes]:
    """A message a sensor actor accepted, for mmfuse-record: the sensor, the frames as they came, and when."""
    return [sensor.encode(), topic, payload, receive_time_frame(arrived_at)]


def decode_accepted(frames: list[bytes]) -> tuple[str, list[bytes], float]:
    """(sensor, [topic, payload], arrival time) of an `encode_accepted` message."""
    arrived_at = receive_time(frames[3]) if len(frames) == 4 else None
    if arrived_at is None:
        raise WireError("frames", f"expected [sensor, topic, payload, arrival time], got {len(frames)} frame(s)")
    try:
        sensor = frames[0].decode()
    except UnicodeDecodeError:
        raise WireError("frames", "the sensor name of an accepted message is not UTF-8") from None
    return sensor, frames[1:3], arrived_at
