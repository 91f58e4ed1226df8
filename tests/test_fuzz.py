"""Fuzzing: malformed frames and single outliers are counted, never raised, and never change a live session.

Random bytes, random msgpack maps and valid messages with one field broken go through the wire decoder
and the sensor ingest; then junk (malformed frames and one-off outliers on the live streams) is mixed
into a live session of three feature sensors that runs through the whole in-process pipeline with the
suite's trained bundle, whose decisions must come out exactly as without the junk.
"""

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfuse import wire
from mmfuse.bundle import load_bundle
from mmfuse.config import parse_config
from mmfuse.ingest import SensorIngest
from mmfuse.pipeline import InProcessPipeline

SENSORS = {"cam0": "visual", "mic0": "audio", "asr0": "text"}
NAMES = list(SENSORS)
RATE = {"cam0": 10, "mic0": 10, "asr0": 2}  # messages per second
SESSION_S = 30.0
START = 1_700_000_000.0  # daemon wall clock at session time 0
FIELDS = ("v", "session", "source", "modality", "seq", "t", "kind", "encoding", "data", "duration", "shape",
          "dtype", "rate")
DELETE = "<delete>"
FAST = settings(deadline=None)  # (Hypothesis keeps its cache in .hypothesis/, which it gitignores itself)


# --- strategies: frames of every shape -------------------------------------------------------------------

words = st.sampled_from(["data", "heartbeat", "end", "features", "pcm16", "jpeg", "rgb8", "utf8", "visual",
                         "audio", "text", "<f4", "<f8", "<f2", "|u1", ">f4", "s", "cam0", "s/x", ""])
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=16)
           | st.binary(max_size=48) | words
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
           | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)))
msgpack_values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=4), max_leaves=12)
map_keys = st.sampled_from(FIELDS) | st.text(max_size=8) | st.binary(max_size=4) | st.integers(-3, 3)
topics = st.sampled_from([b"visual/s", b"audio/s", b"text/s", b"visual/s1", b""]) | st.binary(max_size=24)


def base_messages():
    """One valid message of each encoding and kind, as payload maps with their topics."""
    vector = np.arange(4, dtype="<f4")
    messages = [
        wire.features_message("s", "cam0", "visual", 3, 1.5, vector, duration=0.1),
        wire.features_message("s", "asr0", "text", 3, 1.5, np.ones((2, 4)), duration=0.5),
        wire.SensorMessage("s", "mic0", "audio", 0, 0.0, encoding="pcm16", data=b"\x00\x01" * 16, rate=16000,
                           duration=0.001),
        wire.SensorMessage("s", "cam0", "visual", 1, 0.1, encoding="rgb8", data=bytes(2 * 3 * 3), shape=(2, 3, 3),
                           dtype="|u1"),
        wire.SensorMessage("s", "cam0", "visual", 2, 0.2, encoding="jpeg", data=b"\xff\xd8\xff"),
        wire.SensorMessage("s", "asr0", "text", 3, 0.3, encoding="utf8", data="hello", duration=1.2),
        wire.SensorMessage("s", "asr0", "text", 4, 0.4, kind="heartbeat"),
        wire.SensorMessage("s", "cam0", "visual", 5, 0.5, kind="end"),
    ]
    return [(topic, msgpack.unpackb(payload, raw=False)) for topic, payload in map(wire.encode, messages)]


BASES = base_messages()


def replaced(topic: bytes, body: dict, field, value) -> list[bytes]:
    body = dict(body)
    if value == DELETE:
        body.pop(field, None)
    else:
        body[field] = value
    return [topic, msgpack.packb(body, use_bin_type=True)]


raw_frames = st.lists(st.binary(max_size=200), min_size=1, max_size=3)
map_frames = st.builds(lambda topic, body: [topic, msgpack.packb(body, use_bin_type=True)],
                       topics, st.dictionaries(map_keys, msgpack_values, max_size=10) | msgpack_values)
fields = st.sampled_from(FIELDS) | st.text(max_size=6)
replaced_frames = st.builds(lambda base, field, value: replaced(*base, field, value),
                            st.sampled_from(BASES), fields, st.just(DELETE) | msgpack_values)
any_frames = raw_frames | map_frames | replaced_frames


# --- a. the decoder ----------------------------------------------------------------------------------------

@settings(FAST, max_examples=600)
@given(any_frames, st.sampled_from([wire.DEFAULT_MAX_PAYLOAD, 64]))
def test_decode_of_any_frames_gives_a_message_or_a_wire_error_and_nothing_else(frames, max_payload):
    try:
        message = wire.decode(frames, max_payload)
    except wire.WireError as exc:
        assert isinstance(exc.reason, str) and exc.reason
    else:
        assert isinstance(message, wire.SensorMessage)


@settings(FAST, max_examples=300)
@given(replaced_frames)
def test_a_decoded_message_encodes_back_to_the_same_message(frames):
    try:
        message = wire.decode(frames)
    except wire.WireError:
        return
    assert wire.decode(wire.encode(message)) == message


def with_pair(topic: bytes, body: dict, field, value, first: bool) -> list[bytes]:
    """The payload with one more pair, which may repeat a key (msgpack lets a map hold a key twice)."""
    pairs = list(body.items())
    pairs = [(field, value), *pairs] if first else [*pairs, (field, value)]
    return [topic, msgpack.Packer(use_bin_type=True).pack_map_pairs(pairs)]


def invalid_utf8(topic: bytes, body: dict, field) -> list[bytes]:
    """The payload with one value a msgpack str whose bytes are no UTF-8."""
    marker = "\x00marker\x00"
    payload = msgpack.packb({**body, field: marker}, use_bin_type=True)
    return [topic, payload.replace(marker.encode(), b"\xff\xfe" + bytes(len(marker) - 2))]


doubled_frames = st.builds(lambda base, field, value, first: with_pair(*base, field, value, first),
                           st.sampled_from(BASES), fields, msgpack_values, st.booleans())
trailing_frames = st.builds(lambda base, tail: [base[0], msgpack.packb(base[1], use_bin_type=True) + tail],
                            st.sampled_from(BASES), st.binary(min_size=1, max_size=8))
utf8_frames = st.builds(lambda base, field: invalid_utf8(*base, field), st.sampled_from(BASES), fields)
two_frames = (map_frames | replaced_frames | doubled_frames | trailing_frames | utf8_frames
              | st.lists(st.binary(max_size=200), min_size=2, max_size=2))


def test_every_valid_message_takes_the_compiled_decoder():
    for topic, body in BASES:
        frames = [topic, msgpack.packb(body, use_bin_type=True)]
        assert wire._well_formed(*frames) == wire._checked(*frames)


@settings(FAST, max_examples=1500)
@given(two_frames)
def test_the_compiled_decoder_takes_only_what_the_key_by_key_decoder_takes_as_the_same_message(frames):
    taken = wire._well_formed(*frames)
    if taken is not None:
        assert taken == wire._checked(*frames)


def nested_data(topic: bytes, body: dict, depth: int) -> list[bytes]:
    """The payload with `data` an array nested `depth` deep."""
    pairs = [(k, v) for k, v in body.items() if k != "data"]
    head = msgpack.Packer(use_bin_type=True).pack_map_header(len(pairs) + 1)
    return [topic, head + b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in pairs)
            + msgpack.packb("data") + b"\x91" * depth + b"\xc0"]


@pytest.mark.parametrize("depth", [10, 997, 100_000])
def test_data_nested_deep_decodes_as_the_key_by_key_decoder_says_and_raises_nothing_else(depth):
    for base in BASES:
        frames = nested_data(*base, depth)
        try:
            expected = wire._checked(*frames)
        except wire.WireError as exc:
            expected = exc.reason
        try:
            assert wire.decode(frames) == expected
        except wire.WireError as exc:
            assert exc.reason == expected


def test_a_map_key_that_is_no_string_inside_data_is_refused_by_both_decoders():
    topic, body = next((t, b) for t, b in BASES if b.get("kind") == "heartbeat")
    frames = [topic, msgpack.packb({**body, "data": {1: 2}}, use_bin_type=True)]
    assert wire._well_formed(*frames) is None
    with pytest.raises(wire.WireError):
        wire.decode(frames)


# --- b. the sensor ingest ----------------------------------------------------------------------------------

def stream_frames(session, seq, t, dim, duration, kind):
    if kind == "data":
        message = wire.features_message(session, "cam0", "visual", seq, t, np.full(dim, 0.5), duration)
    else:
        message = wire.SensorMessage(session, "cam0", "visual", seq, t, kind=kind)
    return wire.encode(message)


# valid-looking visual messages of dim 4 (sometimes 5): streams start, go on, leap, restart, repeat, get held
stream_messages = st.builds(
    stream_frames, st.sampled_from(["s", "s2"]), st.integers(0, 12) | st.integers(0, 2**64 - 1),
    st.integers(0, 12).map(float) | st.floats(-1e13, 1e13), st.sampled_from([4, 4, 4, 5]),
    st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 100), st.sampled_from(["data", "data", "heartbeat", "end"]))
ingest_steps = st.lists(st.tuples(any_frames | stream_messages, st.floats(0, 3)), min_size=1, max_size=40)


def held(ingest: SensorIngest) -> int:
    return sum(stream.held is not None for stream in ingest.streams.values())


@settings(FAST, max_examples=200)
@given(ingest_steps)
def test_every_frame_into_the_ingest_is_accepted_rejected_once_or_held_and_nothing_raises(steps):
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, 4)
    now = 100.0
    for sent, (frames, gap) in enumerate(steps, 1):
        now += gap
        before = dict(ingest.rejected.counts)
        ingest.ingest(frames, now)
        grown = {r: n - before.get(r, 0) for r, n in ingest.rejected.counts.items() if n != before.get(r, 0)}
        assert all(n > 0 for n in grown.values()), grown
        assert ingest.accepted + ingest.rejected.total() + held(ingest) == sent
    ingest.take_batch()
    ingest.forget_idle(now + 10 * ingest.idle_s)  # what is still held is counted as an outlier
    assert held(ingest) == 0 and ingest.accepted + ingest.rejected.total() == len(steps)


def valued_frames(session, seq, values, rows, dim, dtype):
    """Features of a stream in step, with any values (NaN, inf, beyond MAX_FEATURE), rows, widths and dtypes."""
    with np.errstate(over="ignore"):
        array = np.resize(np.asarray(values, np.float64), (rows, dim)).astype(dtype)
    return wire.encode(wire.SensorMessage(session, "cam0", "visual", seq, seq * 0.5, encoding="features",
                                          data=array.tobytes(), shape=array.shape, dtype=dtype, duration=0.5))


feature_values = st.lists(st.floats(-10, 10), min_size=1, max_size=12).flatmap(  # mostly fine, some not
    lambda values: st.lists(st.sampled_from([1e6, 1.1e6, 1e30, math.inf, math.nan]) | st.floats(), max_size=1)
    .map(lambda bad: values + bad))
valued_specs = st.tuples(st.sampled_from(["s", "s2"]), feature_values, st.integers(1, 3), st.sampled_from([4, 4, 4, 5]),
                         st.sampled_from(wire.FEATURE_DTYPES))


def in_order(items: list) -> list[list[bytes]]:
    """Frames as read together: the valued messages numbered in order (so most are taken), the rest as drawn."""
    return [valued_frames(item[0], seq, *item[1:]) if isinstance(item, tuple) else item
            for seq, item in enumerate(items)]


read_together = st.lists(valued_specs | valued_specs | stream_messages | any_frames, min_size=1,
                         max_size=60).map(in_order)


def contributions(ingest: SensorIngest) -> tuple:
    batch = ingest.take_batch()
    deltas = [] if batch is None else [(d.session, d.window_id, d.total.tobytes(), d.weight, d.frames, d.gaps)
                                       for d in batch.deltas]
    return deltas, dict(ingest.rejected.counts), ingest.accepted, held(ingest)


@settings(FAST, max_examples=300)
@given(read_together)
def test_messages_checked_together_count_and_contribute_exactly_as_one_by_one(frames):
    one_by_one, together = SensorIngest("cam0", "visual", 1.0, 0.5, 4), SensorIngest("cam0", "visual", 1.0, 0.5, 4)
    for i, message in enumerate(frames):
        one_by_one.ingest(message, 100.0 + i / 10)
    for frame in together.check_values([together.check(message, 100.0 + i / 10, None)
                                        for i, message in enumerate(frames)]):
        together.take(frame)
    assert contributions(together) == contributions(one_by_one)


# --- c, d. the live session through the whole pipeline -----------------------------------------------------

def config_for(bundle_dir):
    return parse_config({
        "bundle": str(bundle_dir), "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{5551 + i}"}
                                               for i, (n, m) in enumerate(SENSORS.items())],
        "window": {"length_s": 1.0, "hop_s": 1.0}, "drop": {"timeout_s": 1.0, "period_factor": 5},
        "pipeline": {"batch_interval_ms": 10, "flush_interval_ms": 200}})


def live_session(dims: dict, seed: int = 0) -> dict[str, list[tuple[float, str, list[bytes]]]]:
    """Per sensor, its stream's (arrival, sensor, frames) in order: features every 1/RATE s for SESSION_S
    seconds, arriving 2-30 ms after each message ends (never out of order). The camera is out from 12 to
    16 s (those windows are restored), the recogniser from 20 to 22 s; their seq goes on."""
    rng = np.random.default_rng(seed)
    streams = {}
    for name, modality in SENSORS.items():
        period, events = 1.0 / RATE[name], []
        for seq, s in enumerate(np.arange(0.0, SESSION_S - 1e-9, period)):
            s = float(s)
            if (name == "cam0" and 12.0 <= s < 16.0) or (name == "asr0" and 20.0 <= s < 22.0):
                continue
            vector = rng.normal(loc=math.sin(s / 3), size=dims[modality])
            message = wire.features_message("s", name, modality, seq, s, vector, duration=period)
            events.append((START + s + period + float(rng.uniform(0.002, 0.03)), name, wire.encode(message)))
        streams[name] = events
    return streams


def summary(decisions):
    return [(d.session, d.window_id, d.revision, d.label, {k: round(v, 6) for k, v in d.scores.items()},
             d.present, d.restored, d.dropped) for d in decisions]


class Live:
    """The live session, its bundle and configuration; `run` replays it with junk mixed in."""

    def __init__(self, bundle_dir):
        self.bundle = load_bundle(bundle_dir)
        self.config = config_for(bundle_dir)
        self.dims = {m: spec["dim"] for m, spec in self.bundle.modalities.items()}
        self.streams = live_session(self.dims)
        self.events = sorted((e for s in self.streams.values() for e in s), key=lambda e: e[0])
        self.first, self.last = self.events[0][0], self.events[-1][0]
        self.bodies = [msgpack.unpackb(frames[1], raw=False) for _, _, frames in self.events]
        self.oversize = {}

    def run(self, junk=()):
        events = sorted(list(self.events) + list(junk), key=lambda e: e[0])
        return InProcessPipeline(self.config, self.bundle).run(events)

    def at(self, u: float) -> float:
        return self.first + u * (self.last - self.first)

    def oversized(self, name: str) -> list[bytes]:
        """A frame of `name`'s stream with a consistent shape, just over the payload limit (one, shared)."""
        if name not in self.oversize:
            topic, payload = self.streams[name][0][2]
            body = msgpack.unpackb(payload, raw=False)
            row = self.dims[SENSORS[name]] * 4
            rows = self.config.pipeline.max_payload_bytes // row + 1
            body.update(data=bytes(rows * row), shape=[rows, row // 4])
            self.oversize[name] = [topic, msgpack.packb(body, use_bin_type=True)]
        return self.oversize[name]


@pytest.fixture(scope="module")
def live(bundle_dir):
    live = Live(bundle_dir)
    clean = live.run()
    assert all(not counts for counts in clean.rejected.values())
    live.clean = summary(clean.decisions)
    assert len(live.clean) == SESSION_S and any(d[6] for d in live.clean)  # every window, some restored
    assert summary(live.run().decisions) == live.clean  # the pipeline is deterministic to begin with
    return live


MUTATIONS = ("dim", "nan", "version", "topic", "shape", "negative_seq", "t_ms", "long_duration", "oversize")


def mutated(live: Live, index: int, kind: str, value) -> tuple[str, list[bytes]]:
    """The live session's frame `index` with one field broken so that its sensor must reject it."""
    _, name, (topic, _) = live.events[index]
    body = dict(live.bodies[index])
    dim = live.dims[SENSORS[name]]
    if kind == "oversize":
        return name, live.oversized(name)
    if kind == "dim":
        rows, delta = value
        wrong = dim + delta if dim + delta >= 1 else dim + abs(delta)
        body.update(data=np.ones((rows, wrong), "<f4").tobytes(), shape=[rows, wrong] if rows > 1 else [wrong])
    elif kind == "nan":
        where, bad = value
        vector = np.frombuffer(body["data"], "<f4").copy()
        vector[int(where * (len(vector) - 1))] = bad
        body["data"] = vector.tobytes()
    elif kind == "version":
        if value == DELETE:
            del body["v"]
        else:
            body["v"] = value
    elif kind == "topic":
        topic = value if value != topic else topic + b"x"
    elif kind == "shape":
        shape = [dim if n == "D" else n for n in value]
        if len(shape) in (1, 2) and math.prod(shape) == dim and shape[-1] == dim:  # happens to be right
            shape = [2**62 + 1, dim]
        body["shape"] = shape
    elif kind == "negative_seq":
        body["seq"] = value
    elif kind == "t_ms":
        body["t"] = {"epoch_ms": (START + body["t"]) * 1e3, "epoch_ns": (START + body["t"]) * 1e9}.get(value, value)
    elif kind == "long_duration":
        body["duration"] = body["duration"] * 1000 if value == "ms" else value
    return name, [topic, msgpack.packb(body, use_bin_type=True)]


def outlier(live: Live, index: int, kind: str, amount, u: float) -> tuple[tuple[str, int], tuple]:
    """A copy of a live frame with seq far ahead or t far off, sent once, between the frame before it in its
    stream and the frame itself (never before its stream's first frame: that one makes the stream)."""
    name = NAMES[index % 3]
    events = live.streams[name]
    p = 1 + (index // 3) % (len(events) - 1)
    (before, _, _), (after, _, (topic, payload)) = events[p - 1], events[p]
    body = msgpack.unpackb(payload, raw=False)
    if kind == "seq":
        body["seq"] += amount
    else:
        body["t"] += amount
    at = before + (0.05 + 0.9 * u) * (after - before)
    return (name, p), (at, name, [topic, msgpack.packb(body, use_bin_type=True)])


unit = st.floats(0, 1)
live_index = st.integers(0, 10**6)
mutation_values = {
    "dim": st.tuples(st.integers(1, 3), st.integers(-60, 60).filter(bool)),
    "nan": st.tuples(unit, st.sampled_from([math.nan, math.inf, -math.inf])),
    "version": st.sampled_from([True, False, 1.0, 2, 0, -1, 2**64 - 1, "1", None, b"\x01", [1], {"v": 1}, DELETE]),
    "topic": st.sampled_from([b"", b"visual/s2", b"audio/s", b"text/s", b"visual/S", b"visual/s\x00"])
    | st.binary(max_size=20),
    "shape": st.sampled_from([[2**62 + 1, "D"], [2**60 + 1, "D"], [2**64 - 1, "D"], ["D", 2**62 + 1], [0, "D"],
                              [-1, "D"], ["D", 0], [1, 1, "D"], [], ["D", "D"]])
    | st.lists(st.integers(-2**63, 2**64 - 1), max_size=4),
    "negative_seq": st.integers(-2**63, -1),
    "t_ms": st.sampled_from(["epoch_ms", "epoch_ns"]) | st.floats(1e12, 1e300, exclude_min=True)
    | st.floats(-1e300, -1e12, exclude_max=True),
    "long_duration": st.just("ms") | st.floats(60.0, 1e300, exclude_min=True),
    "oversize": st.none(),
}
junk_specs = st.one_of(
    st.tuples(st.just("bytes"), st.sampled_from(NAMES), unit, raw_frames),
    st.tuples(st.just("map"), st.sampled_from(NAMES), unit, map_frames),
    st.tuples(st.just("replace"), live_index, unit, fields, st.just(DELETE) | msgpack_values),
    *[st.tuples(st.just("mutate"), live_index, unit, st.just(kind), values)
      for kind, values in mutation_values.items()],
    st.tuples(st.just("outlier"), live_index, unit, st.just("seq"), st.integers(1001, 2**40)),
    st.tuples(st.just("outlier"), live_index, unit, st.just("t"),
              st.floats(100.0, 1e6, exclude_min=True) | st.floats(-1e6, -100.0, exclude_max=True)),
)


def realise(live: Live, specs) -> list[tuple[float, str, list[bytes]]]:
    """Junk events from drawn specs. Malformed frames arrive at any time within the session; field
    replacements the decoder happens to accept are not junk and are left out. An outlier arrives between two
    frames of its stream, at most one per gap: not after the stream's last frame (no next message would judge
    it; it stays held), nor before its first (a stream's first message is taken as it comes, so a
    forged one that arrives first makes the stream: what CURVE authentication is for)."""
    junk, gaps = [], set()
    for spec in specs:
        what, where, u = spec[:3]
        if what in ("bytes", "map"):
            frames, name = spec[3], where
            try:
                wire.decode(frames)
                continue  # (a random map that is a valid message: never seen, but it would be no junk)
            except wire.WireError:
                pass
        elif what == "replace":
            index = where % len(live.events)
            name, (topic, _) = live.events[index][1], live.events[index][2]
            frames = replaced(topic, live.bodies[index], spec[3], spec[4])
            try:
                wire.decode(frames)
                continue
            except wire.WireError:
                pass
        elif what == "mutate":
            name, frames = mutated(live, where % len(live.events), spec[3], spec[4])
        else:
            gap, event = outlier(live, where, spec[3], spec[4], u)
            if gap not in gaps:
                gaps.add(gap)
                junk.append(event)
            continue
        junk.append((live.at(u), name, frames))
    return junk


@settings(FAST, max_examples=20)
@given(st.lists(junk_specs, min_size=5, max_size=80))
def test_junk_and_single_outliers_mixed_into_a_live_session_leave_its_decisions_unchanged(live, specs):
    junk = realise(live, specs)
    result = live.run(junk)
    assert summary(result.decisions) == live.clean
    assert sum(sum(counts.values()) for counts in result.rejected.values()) == len(junk), result.rejected


def many_malformed(live: Live, count: int, seed: int = 0) -> list[tuple[float, str, list[bytes]]]:
    """`count` malformed frames cycling through the mutation kinds, random bytes and random maps, at random
    times within the session, plus one outlier (seq or t) in every third gap of every stream."""
    rng = np.random.default_rng(seed)
    kinds = MUTATIONS + ("bytes", "map")
    values = {
        "dim": lambda: (int(rng.integers(1, 3)), int(rng.choice([-1, 1])) * int(rng.integers(1, 60))),
        "nan": lambda: (float(rng.random()), [math.nan, math.inf, -math.inf][int(rng.integers(3))]),
        "version": lambda: [True, 1.0, 2, 0, "1", None, DELETE][int(rng.integers(7))],
        "topic": lambda: [b"", b"visual/s2", b"audio/s", b"text/s", rng.bytes(8)][int(rng.integers(5))],
        "shape": lambda: [[2**62 + 1, "D"], [2**60 + 1, "D"], ["D", 0], [1, 1, "D"], [-1, "D"]][int(rng.integers(5))],
        "negative_seq": lambda: -int(rng.integers(1, 2**62)),
        "t_ms": lambda: ["epoch_ms", "epoch_ns"][int(rng.integers(2))],
        "long_duration": lambda: "ms" if rng.random() < 0.5 else float(rng.uniform(60.001, 1e5)),
        "oversize": lambda: None,
    }
    times = live.first + rng.random(count) * (live.last - live.first)
    indices = rng.integers(0, len(live.events), count)
    junk = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "bytes":
            name = NAMES[i % 3]
            frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
        elif kind == "map":
            name = NAMES[i % 3]
            body = {"v": 1, "session": int(rng.integers(100)), FIELDS[int(rng.integers(len(FIELDS)))]: rng.bytes(4)}
            frames = [f"{SENSORS[name]}/s".encode(), msgpack.packb(body, use_bin_type=True)]
        else:
            name, frames = mutated(live, int(indices[i]), kind, values[kind]())
        junk.append((float(times[i]), name, frames))
    for k, name in enumerate(NAMES):
        for p in range(1, len(live.streams[name]), 3):
            kind, amount = (("seq", int(rng.integers(1001, 10**9))) if p % 2 else
                            ("t", float(rng.choice([-1, 1]) * rng.uniform(100.001, 1e5))))
            junk.append(outlier(live, 3 * (p - 1) + k, kind, amount, float(rng.random()))[1])
    return junk


MANY = 100_000


def test_a_hundred_thousand_malformed_frames_leave_a_live_sessions_decisions_unchanged(live):
    junk = many_malformed(live, MANY)
    result = live.run(junk)
    assert summary(result.decisions) == live.clean
    rejected = {}
    for counts in result.rejected.values():
        for reason, n in counts.items():
            rejected[reason] = rejected.get(reason, 0) + n
    assert sum(rejected.values()) == len(junk), rejected
    assert rejected["outlier"] == len(junk) - MANY
