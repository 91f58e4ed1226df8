import msgpack
import numpy as np
import pytest

from mmfuse import wire


def payload(**overrides):
    body = {"v": 1, "session": "s1", "source": "cam0", "modality": "visual", "seq": 3, "t": 1.5, "kind": "data",
            "encoding": "features", "data": np.arange(4, dtype="<f4").tobytes(), "shape": [4], "dtype": "<f4",
            "duration": 0.5}
    body.update(overrides)
    for key, value in list(body.items()):
        if value is ...:
            del body[key]
    return body


def frames(body, topic=None):
    topic = topic if topic is not None else f"{body.get('modality')}/{body.get('session')}".encode()
    return [topic, msgpack.packb(body, use_bin_type=True)]


def test_features_round_trip():
    message = wire.features_message("s1", "cam0", "visual", 7, 12.25, np.array([1.5, -2.0, 3.0]), duration=2.0)
    decoded = wire.decode(wire.encode(message))
    assert decoded == message
    np.testing.assert_array_equal(decoded.array(), np.array([1.5, -2.0, 3.0], np.float32))
    assert wire.encode(message)[0] == b"visual/s1"


@pytest.mark.parametrize("message", [
    wire.SensorMessage("s", "mic0", "audio", 0, 0.0, encoding="pcm16", data=b"\x00\x01" * 160, rate=16000,
                       duration=0.01),
    wire.SensorMessage("s", "cam0", "visual", 1, 0.1, encoding="rgb8", data=bytes(2 * 3 * 3), shape=(2, 3, 3),
                       dtype="|u1"),
    wire.SensorMessage("s", "cam0", "visual", 2, 0.2, encoding="jpeg", data=b"\xff\xd8\xff"),
    wire.SensorMessage("s", "asr0", "text", 3, 0.3, encoding="utf8", data="héllo wörld", duration=1.2),
    wire.SensorMessage("s", "asr0", "text", 4, 0.4, kind="heartbeat"),
    wire.SensorMessage("s", "asr0", "text", 5, 0.5, kind="end"),
])
def test_every_encoding_and_kind_round_trips(message):
    assert wire.decode(wire.encode(message)) == message


def test_features_matrix_of_frames():
    message = wire.features_message("s", "mic0", "audio", 0, 0.0, np.ones((5, 8)), duration=1.0)
    assert wire.decode(wire.encode(message)).array().shape == (5, 8)


@pytest.mark.parametrize("frames_, reason", [
    ([b"visual/s1"], "frames"),
    ([b"visual/s1", msgpack.packb(payload())[:-7]], "msgpack"),
    ([b"visual/s1", b"\xc1garbage"], "msgpack"),
    ([b"visual/s1", msgpack.packb([1, 2, 3])], "not_a_map"),
    (frames(payload(v=2)), "version"),
    (frames(payload(v=...)), "version"),
    (frames(payload(session=...)), "missing:session"),
    (frames(payload(seq=...)), "bad_type:seq"),
    (frames(payload(t=...)), "missing:t"),
    (frames(payload(seq="3")), "bad_type:seq"),
    (frames(payload(seq=-1)), "bad_type:seq"),
    (frames(payload(t="soon")), "bad_type:t"),
    (frames(payload(t=float("nan"))), "bad_type:t"),
    (frames(payload(session=7)), "bad_type:session"),
    (frames(payload(session="")), "bad_type:session"),
    (frames(payload(modality="smell")), "bad_value:modality"),
    (frames(payload(kind="chirp")), "bad_value:kind"),
    (frames(payload(encoding="mp3")), "bad_value:encoding"),
    (frames(payload(data="not bytes")), "bad_type:data"),
    (frames(payload(shape=[5])), "shape"),
    (frames(payload(shape="4")), "bad_type:shape"),
    (frames(payload(dtype="<i8")), "bad_value:dtype"),
    (frames(payload(duration=-1.0)), "bad_value:duration"),
    (frames(payload(duration=1e308)), "bad_value:duration"),
    (frames(payload(t=1.7e18)), "bad_value:t"),  # epoch nanoseconds
    (frames(payload(), topic=b"audio/s1"), "topic"),
    (frames(payload(encoding="pcm16", rate=None)), "bad_type:rate"),
    (frames(payload(encoding="utf8", data=b"bytes")), "bad_type:data"),
    (frames(payload(encoding="rgb8", shape=[2, 2], dtype="|u1")), "shape"),
])
def test_invalid_payloads_name_the_reason(frames_, reason):
    with pytest.raises(wire.WireError) as caught:
        wire.decode(frames_)
    assert caught.value.reason == reason


def test_oversized_payload_is_rejected_before_parsing():
    big = frames(payload(data=np.zeros(1000, "<f4").tobytes(), shape=[1000]))
    with pytest.raises(wire.WireError) as caught:
        wire.decode(big, max_payload=1000)
    assert caught.value.reason == "oversized"
    assert wire.decode(big, max_payload=10_000).shape == (1000,)


def test_decision_round_trip():
    decision = wire.Decision("s1", 4, 8.0, 10.0, "sentiment", "positive", {"negative": 0.2, "positive": 0.8},
                             ["audio", "text"], ["visual"], ["cam0"], "mean", 3.5, "demo-1", closed_at=123.0)
    topic, body = wire.encode_decision(decision)
    assert topic == b"decision/s1"
    decoded = wire.decode_decision([topic, body])
    assert decoded == {"v": 1, "session": "s1", "window": {"id": 4, "start": 8.0, "end": 10.0, "revision": 0},
                       "task": "sentiment", "label": "positive", "scores": {"negative": 0.2, "positive": 0.8},
                       "present": ["audio", "text"], "restored": ["visual"], "dropped": ["cam0"],
                       "restorer": "mean", "latency_ms": 3.5, "bundle": "demo-1"}


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_version_that_only_equals_1_is_refused(version):
    body = {"v": version, "session": "s", "source": "cam0", "modality": "visual", "seq": 0, "t": 0.0,
            "kind": "heartbeat"}
    with pytest.raises(wire.WireError) as raised:
        wire.decode([b"visual/s", msgpack.packb(body)])
    assert raised.value.reason == "version"


def test_a_shape_whose_product_overflows_is_a_shape_error():
    body = {"v": 1, "session": "s", "source": "cam0", "modality": "visual", "seq": 0, "t": 0.0, "kind": "data",
            "encoding": "features", "data": bytes(400), "shape": [2**62 + 1, 100], "dtype": "<f4"}
    with pytest.raises(wire.WireError) as raised:
        wire.decode([b"visual/s", msgpack.packb(body, use_bin_type=True)])
    assert raised.value.reason == "shape"


def test_a_decision_names_the_messages_it_went_without():
    decision = wire.Decision("s1", 4, 8.0, 10.0, "sentiment", "positive", {"positive": 1.0}, ["visual"], [], [],
                             "none", 1.0, "demo-1", revision=1, seq_gaps={"visual": 3}, late={"audio": 7})
    decoded = wire.decode_decision(wire.encode_decision(decision))
    assert decoded["seq_gaps"] == {"visual": 3} and decoded["late"] == {"audio": 7}


def test_a_decision_without_the_protocols_keys_or_with_a_value_of_another_type_is_a_wire_error():
    good = {"v": 1, "session": "s1", "window": {"id": 0, "start": 0.0, "end": 2.0, "revision": 0},
            "label": "positive", "scores": {"negative": 0.3, "positive": 0.7}, "present": ["audio"], "restored": [],
            "dropped": [], "latency_ms": 5.0, "a_later_key": [1]}
    assert wire.decode_decision([b"decision/s1", msgpack.packb(good)]) == good
    for bad in ({"v": 1}, {**good, "scores": {}}, {**good, "window": 3}, {**good, "label": 5},
                {**good, "scores": {"a": "x"}}, {**good, "window": {"id": 0}}):
        with pytest.raises(wire.WireError, match="not a decision as docs/protocol.md gives it"):
            wire.decode_decision([b"decision/s1", msgpack.packb(bad)])
