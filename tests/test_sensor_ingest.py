import msgpack
import numpy as np
import pytest

from mmfuse import wire
from mmfuse.ingest import SensorIngest, windows_overlapping


@pytest.mark.parametrize("start, end, length, hop, expected", [
    (0.0, 2.0, 2.0, 2.0, [0]),
    (0.5, 0.5, 2.0, 2.0, [0]),
    (2.0, 2.0, 2.0, 2.0, [1]),
    (1.0, 3.0, 2.0, 2.0, [0, 1]),
    (1.0, 1.5, 2.0, 1.0, [0, 1]),
    (4.0, 6.0, 2.0, 2.0, [2]),
    (-1.0, 0.0, 2.0, 2.0, [-1]),
])
def test_windows_overlapping(start, end, length, hop, expected):
    assert list(windows_overlapping(start, end, length, hop)) == expected


def ingest(dim=4, length=2.0, hop=2.0):
    return SensorIngest("cam0", "visual", length, hop, dim)


def send(sensor, seq, t, vector=None, duration=2.0, session="s1", source="cam0", kind="data", at=100.0):
    if kind == "data":
        message = wire.features_message(session, source, "visual", seq, t, np.asarray(vector), duration)
    else:
        message = wire.SensorMessage(session, source, "visual", seq, t, kind=kind)
    sensor.ingest(wire.encode(message), at)


def test_features_become_window_sums_and_progress():
    sensor = ingest()
    send(sensor, 0, 0.0, [1, 1, 1, 1], duration=1.0)
    send(sensor, 1, 1.0, [3, 3, 3, 3], duration=2.0)  # half in window 0, half in window 1
    batch = sensor.take_batch()
    by_window = {d.window_id: d for d in batch.deltas}
    assert by_window[0].weight == pytest.approx(1.5)
    np.testing.assert_allclose(by_window[0].total / by_window[0].weight, [5 / 3] * 4)
    np.testing.assert_allclose(by_window[1].total / by_window[1].weight, [3] * 4)
    (progress,) = batch.progress
    assert progress.progress == 3.0 and not progress.ended
    assert sensor.take_batch() is None


def test_a_live_sensor_hands_over_an_account_even_when_nothing_happened():
    sensor = ingest()
    assert sensor.take_batch() is None
    send(sensor, 0, 0.0, [1, 1, 1, 1], duration=1.0)
    assert sensor.take_batch(as_of=100.5).as_of == 100.5
    quiet = sensor.take_batch(as_of=100.7)
    assert (quiet.deltas, quiet.progress, quiet.as_of) == ([], [], 100.7)


def test_a_batch_due_at_a_window_end_waits_briefly_for_the_sessions_whose_windows_end_with_it():
    sensor = ingest(length=1.0, hop=1.0)
    for session in ("s1", "s2", "s3"):
        send(sensor, 0, 0.0, [1] * 4, duration=0.5, session=session, at=100.5)
    send(sensor, 0, 0.0, [1] * 4, duration=0.1, session="apart", at=100.5)  # its windows end 0.4 s later
    send(sensor, 0, 0.0, [1] * 4, duration=0.5, session="gone", at=98.4)  # last heard over two windows ago
    sensor.take_batch()
    send(sensor, 1, 0.5, [1] * 4, duration=0.5, session="s1", at=101.0)  # s1 reached the end of window 0

    def due(now):
        return sensor.push_due(0.05, 0.01, 0.2, now, gather=0.02)

    assert sensor.due and not due(101.005)  # s2 and s3 are still short of it
    send(sensor, 1, 0.5, [1] * 4, duration=0.5, session="s2", at=101.006)
    assert not due(101.007)
    send(sensor, 1, 0.5, [1] * 4, duration=0.5, session="s3", at=101.008)
    assert due(101.008)  # all there: at once, without waiting out the gather time
    sensor.take_batch()
    send(sensor, 2, 1.0, [1] * 4, duration=1.0, session="s1", at=102.0)
    assert not due(102.01) and due(102.021)  # the others never came: it goes after the gather time
    assert sensor.push_due(0.05, 0.01, 0.2)  # without a wall time: at once, as on the virtual clock


def test_malformed_messages_are_counted_not_raised():
    sensor = ingest()
    sensor.ingest([b"visual/s1", b"\x00\xff\x13"], 1.0)
    sensor.ingest([b"visual/s1"], 1.0)
    sensor.ingest([b"visual/s1", msgpack.packb({"v": 9})], 1.0)
    send(sensor, 0, 0.0, [1, 2, 3])  # wrong dimension for this bundle
    assert sensor.rejected.counts == {"msgpack": 1, "frames": 1, "version": 1, "dim": 1}
    assert sensor.take_batch() is None
    send(sensor, 0, 0.0, [1, 2, 3, 4])
    assert sensor.accepted == 1


def test_duplicates_and_gaps():
    sensor = ingest()
    send(sensor, 0, 0.0, [1, 1, 1, 1])
    send(sensor, 0, 0.0, [1, 1, 1, 1])
    send(sensor, 5, 2.0, [1, 1, 1, 1])
    assert sensor.rejected.counts == {"duplicate_or_reordered": 1}
    assert sensor.stats()["seq_gaps"] == 4


def test_media_without_encoder_keeps_the_stream_alive():
    sensor = ingest()
    message = wire.SensorMessage("s1", "cam0", "visual", 0, 0.5, encoding="jpeg", data=b"\xff\xd8", duration=0.1)
    sensor.ingest(wire.encode(message), 1.0)
    batch = sensor.take_batch()
    assert batch.deltas == [] and batch.progress[0].progress == pytest.approx(0.6)
    assert sensor.unsupported.counts == {"jpeg": 1}


def test_heartbeat_end_and_offset():
    sensor = ingest()
    send(sensor, 0, 10.0, kind="heartbeat", at=110.5)
    send(sensor, 1, 11.0, kind="heartbeat", at=111.2)
    send(sensor, 2, 12.0, kind="end", at=112.9)
    (progress,) = sensor.take_batch().progress
    assert progress.ended and progress.progress == 12.0
    assert progress.offset == pytest.approx(100.2)


def test_message_of_wrong_modality_is_rejected():
    sensor = ingest()
    message = wire.features_message("s1", "mic0", "audio", 0, 0.0, np.ones(4))
    sensor.ingest(wire.encode(message), 1.0)
    assert sensor.rejected.counts == {"modality": 1}


def test_streams_idle_past_the_session_idle_time_are_forgotten():
    sensor = SensorIngest("cam0", "visual", 2.0, 2.0, 4, idle_s=60.0)
    send(sensor, 0, 0.0, [1, 1, 1, 1], session="old", at=100.0)
    send(sensor, 0, 50.0, [1, 1, 1, 1], session="live", at=150.0)
    sensor.take_batch()
    sensor.forget_idle(159.0)
    assert set(sensor.streams) == {("old", "cam0"), ("live", "cam0")}
    sensor.forget_idle(161.0)
    assert set(sensor.streams) == {("live", "cam0")}
    send(sensor, 7, 200.0, [1, 1, 1, 1], session="old", at=300.0)  # heard again: a fresh stream, nothing rejected
    assert sensor.streams[("old", "cam0")].last_seq == 7 and not sensor.rejected.counts


def test_a_message_spanning_more_than_a_minute_is_rejected():
    sensor = SensorIngest("cam0", "visual", 2.0, 2.0, 4, max_span_s=60.0)
    send(sensor, 0, 0.0, [1, 1, 1, 1], duration=3600.0)  # milliseconds sent as seconds
    assert sensor.rejected.counts == {"too_long": 1} and sensor.take_batch() is None


@pytest.mark.parametrize("bad", [np.ones(5), np.array([1.0, np.nan, 0.0, 0.0])])
def test_a_rejected_frame_far_ahead_touches_no_stream_state(bad):
    sensor = ingest()
    send(sensor, 0, 0.0, np.ones(4), at=100.0)
    before = (sensor.streams[("s1", "cam0")].last_seq, sensor.streams[("s1", "cam0")].clock.estimate())
    send(sensor, 10**12, 1e9, bad, at=100.1)  # wrong dimension, or not finite: rejected
    send(sensor, 10**12, 1e9, bad, session="never", at=100.2)
    stream = sensor.streams[("s1", "cam0")]
    assert (stream.last_seq, stream.clock.estimate()) == before and ("s1", "never") not in sensor.streams
    send(sensor, 1, 2.0, np.ones(4), at=102.0)  # the genuine next frame is no duplicate
    assert stream.last_seq == 1 and sensor.rejected.total() == 2


def live(sensor, messages=12, period=1.0, at=100.0):
    """A settled stream: one message per second, arriving 0.05 s after it ends."""
    for seq in range(messages):
        send(sensor, seq, seq * period, np.ones(4), duration=period, at=at + (seq + 1) * period + 0.05)


def test_one_message_far_ahead_in_seq_does_not_silence_the_stream():
    sensor = ingest()
    live(sensor)
    send(sensor, 10**12, 12.0, np.full(4, 9.0), duration=1.0, at=113.05)
    for seq in range(12, 20):  # the genuine stream goes on where it was
        send(sensor, seq, float(seq), np.ones(4), duration=1.0, at=101.05 + seq)
    stream = sensor.streams[("s1", "cam0")]
    assert sensor.rejected.counts == {"outlier": 1} and stream.last_seq == 19 and stream.held is None
    assert all((d.total == d.weight).all() for d in sensor.take_batch().deltas)  # nothing of the 9s arrived


@pytest.mark.parametrize("t", [1e6, -50.0, 14.5])
def test_one_message_far_off_in_time_moves_no_clock(t):
    sensor = ingest()
    live(sensor)
    before = sensor.streams[("s1", "cam0")].clock.estimate()
    send(sensor, 12, t, np.full(4, 9.0), duration=1.0, at=113.05)
    send(sensor, 13, 12.0, np.ones(4), duration=1.0, at=113.10)
    stream = sensor.streams[("s1", "cam0")]
    assert sensor.rejected.counts == {"outlier": 1} and stream.clock.resets == 0
    assert stream.clock.estimate()["offset_s"] == pytest.approx(before["offset_s"], abs=0.06)
    assert stream.progress == 13.0


def test_a_restart_or_clock_jump_the_next_message_confirms_is_taken():
    sensor = ingest()
    live(sensor)
    send(sensor, 0, 500.0, np.ones(4), duration=1.0, at=113.05)  # the source restarted on another clock
    assert sensor.streams[("s1", "cam0")].held is not None
    send(sensor, 1, 501.0, np.ones(4), duration=1.0, at=114.05)
    stream = sensor.streams[("s1", "cam0")]
    assert not sensor.rejected.counts and stream.held is None and stream.last_seq == 1
    assert stream.clock.resets == 1 and stream.progress == pytest.approx(14.0)  # its timeline stays continuous


def test_a_thinned_out_camera_frame_that_cannot_be_decoded_touches_no_stream_state():
    from mmfuse.media import MediaEncoder

    class Tower:
        def encode(self, items):
            return np.ones((len(items), 4), np.float32)

    sensor = SensorIngest("cam0", "visual", 2.0, 2.0, 4, media=MediaEncoder("visual", Tower(), 2.0))
    frame = np.zeros((8, 8, 3), np.uint8)
    sensor.ingest(wire.encode(wire.rgb8_message("s1", "cam0", 0, 0.0, frame, 0.1)), 100.1)
    sensor.ingest(wire.encode(wire.jpeg_message("s1", "cam0", 1, 0.1, b"\xff\xd8 junk", 0.1)), 100.2)
    stream = sensor.streams[("s1", "cam0")]
    assert sensor.rejected.counts == {"undecodable": 1} and stream.last_seq == 0 and stream.progress == 0.1
    assert stream.clock.seen == 1


def test_without_authentication_a_sensor_still_never_takes_frames_as_another_configured_sensor():
    """The aligner knows a session's streams by source: camera frames named `asr0` would be merged into the
    text sensor's stream and cost it its own windows."""
    from mmfuse.config import parse_config
    from mmfuse.pipeline import build_ingest

    config = parse_config({"bundle": "models/x", "sensors": [
        {"name": "cam0", "modality": "visual", "endpoint": "tcp://127.0.0.1:1"},
        {"name": "asr0", "modality": "text", "endpoint": "tcp://127.0.0.1:2"}]})
    camera = build_ingest(config, config.sensors[0], 4)
    camera.ingest(wire.encode(wire.features_message("s1", "asr0", "visual", 0, 0.0, np.ones(4))), 100.0)
    camera.ingest(wire.encode(wire.features_message("s1", "cam9", "visual", 0, 0.0, np.ones(4))), 100.0)
    assert camera.rejected.counts == {"wrong_source": 1} and list(camera.streams) == [("s1", "cam9")]


def test_with_authenticated_sensors_only_the_sensors_key_may_send_and_never_as_another_sensor():
    sensor = SensorIngest("cam0", "visual", 2.0, 2.0, 4, sender_key="CAMKEY", other_sensors=frozenset({"asr0"}))
    frames = wire.encode(wire.features_message("s1", "cam0", "visual", 0, 0.0, np.ones(4)))
    sensor.ingest(frames, 100.0, sender="OTHERKEY")
    sensor.ingest(wire.encode(wire.features_message("s1", "asr0", "visual", 0, 0.0, np.ones(4))), 100.0,
                  sender="CAMKEY")
    assert sensor.rejected.counts == {"wrong_source": 2} and not sensor.streams
    sensor.ingest(frames, 100.0, sender="CAMKEY")
    assert sensor.accepted == 1


def test_features_too_large_to_sum_are_rejected_before_they_overflow_a_window():
    sensor = ingest()
    send(sensor, 0, 0.0, np.full(4, 3.0e38))  # finite float32, but two of them sum to inf
    assert sensor.rejected.counts == {"out_of_range": 1} and not sensor.streams


@pytest.mark.parametrize("values, reason", [
    ([0.0, 0.0, 1.0000001e6, 0.0], "out_of_range"),  # just past the limit: the quick sum-of-squares check defers
    ([1e20, 1.0, 1.0, 1.0], "out_of_range"),         # its square would overflow float32
    ([np.nan, 0.0, 0.0, 0.0], "non_finite"),
    ([-np.inf, 0.0, 0.0, 0.0], "non_finite"),
])
def test_every_feature_value_past_the_limit_is_caught_however_the_rest_look(values, reason):
    sensor = ingest()
    send(sensor, 0, 0.0, np.array(values))
    assert sensor.rejected.counts == {reason: 1} and not sensor.streams
    send(sensor, 0, 0.0, np.array([1e6, -1e6, 1e6, -1e6]))  # at the limit is a value
    assert sensor.accepted == 1
