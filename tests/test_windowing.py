"""Golden windowing: sensor messages with real-world timing faults in, closed windows out.

Messages go through the daemon's own pipeline, up to the aligner, in one process on the
virtual clock (mmfuse.pipeline.InProcessPipeline), so every run closes exactly the same
windows. Each feature
vector holds the session time it was sent at, so a window's mean tells where its data
came from: window k of 1 s holds values in [k, k+1) when every clock was mapped right.
"""

import numpy as np
import pytest

from mmfuse import wire
from mmfuse.aligner import Aligner
from mmfuse.config import parse_config
from mmfuse.pipeline import InProcessPipeline
from mmfuse.virtual_clock import AlignerTicks, Tick

SENSORS = {"cam0": "visual", "mic0": "audio", "asr0": "text"}
RATE = {"cam0": 10, "mic0": 10, "asr0": 2}  # messages per second
WINDOW, TIMEOUT, BATCH, FLUSH = 1.0, 1.0, 0.01, 0.2
START = 1_700_000_000.0  # daemon wall clock at session time 0


def run(events, lateness=0.0, bound=0.0, slot=None):
    """events: (arrival, sensor, message) → (closed windows, the ingests, the aligner). With `slot`: utterance
    windows cut at that resolution, WINDOW long while no text stream is live."""
    window = {"mode": "utterance", "slot_s": slot} if slot else {"allowed_lateness_s": lateness}
    config = parse_config({
        "bundle": "unused", "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{5551 + i}"}
                                        for i, (n, m) in enumerate(SENSORS.items())],
        "window": {"length_s": WINDOW, "hop_s": WINDOW, "watermark_bound_s": bound, **window},
        "drop": {"timeout_s": TIMEOUT, "period_factor": 5},
        "pipeline": {"batch_interval_ms": BATCH * 1000, "flush_interval_ms": FLUSH * 1000}})
    pipeline = InProcessPipeline(config, dims=dict.fromkeys(SENSORS.values(), 2))
    result = pipeline.run([(at, name, wire.encode(message)) for at, name, message in sorted(events, key=lambda e: e[0])])
    return result.closed, pipeline.ingests, pipeline.aligner


def stream(name, until, clock=lambda s: s, delay=lambda s: 0.005, start=0.0, seq0=0, session="s"):
    """A sensor sending every 1/RATE s of session time s from `start` to `until`: stamped by its own `clock(s)`,
    arriving at START + s + duration + delay(s). Each vector is [s, s] (s: the span's start)."""
    period = 1.0 / RATE[name]
    events = []
    for i, s in enumerate(np.arange(start, until - 1e-9, period)):
        s = float(s)
        message = wire.features_message(session, name, SENSORS[name], seq0 + i, clock(s), np.full(2, s),
                                         duration=period)
        events.append((START + s + period + delay(s), name, message))
    return events


def summary(closed):
    return [(w.window_id, w.present, w.dropped) for w in closed if not w.revision]


def assert_means_in_place(closed, slack=0.0):
    for w in closed:
        for modality, vector in w.features.items():
            assert w.start - slack <= vector[0] <= w.end + slack, (w.window_id, modality, vector)


ALL = ["audio", "text", "visual"]


def test_jitter_closes_every_window_once_with_its_own_data():
    rng = np.random.default_rng(0)
    events = [e for name in SENSORS for e in stream(name, 5.0, delay=lambda s: 0.002 + rng.exponential(0.02))]
    closed, ingests, _ = run(events)
    assert summary(closed) == [(k, ALL, []) for k in range(5)]
    assert_means_in_place(closed)
    assert all(not i.rejected.counts for i in ingests.values())


def test_reordered_and_duplicated_messages_are_counted_and_change_nothing():
    events = [e for name in SENSORS for e in stream(name, 5.0)]
    cam = [e for e in events if e[1] == "cam0"]
    swapped = [(cam[11][0] + 0.001, "cam0", cam[10][2])]  # frame 10 overtaken by frame 11
    duplicates = [(e[0] + 0.003, e[1], e[2]) for e in cam[20:25]]
    clean, _, _ = run(events)
    closed, ingests, _ = run([e for e in events if e is not cam[10]] + swapped + duplicates)
    assert ingests["cam0"].rejected.counts == {"duplicate_or_reordered": 6}
    assert summary(closed) == summary(clean)
    assert_means_in_place(closed)


def test_a_clock_offset_and_drift_are_mapped_onto_the_session_clock():
    # the microphone's clock is 3 days behind and runs 200 ppm fast; the others are on the session clock
    events = [e for name in ("cam0", "asr0") for e in stream(name, 30.0)]
    events += stream("mic0", 30.0, clock=lambda s: s * 1.0002 - 259_200.0)
    closed, ingests, aligner = run(events)
    assert summary(closed) == [(k, ALL, []) for k in range(30)]  # its first 4 s were held until its clock was known
    assert_means_in_place(closed)
    line = ingests["mic0"].streams[("s", "mic0")].clock.line
    assert line.drift == pytest.approx(-2e-4, abs=2e-5) and aligner.counts["late"] == 0


def test_a_clock_reset_keeps_the_stream_in_its_windows():
    # the camera's clock restarts from 0 at session time 10 s; its seq goes on
    events = [e for name in ("mic0", "asr0") for e in stream(name, 20.0)]
    events += stream("cam0", 20.0, clock=lambda s: s if s < 10 else s - 10)
    closed, ingests, aligner = run(events)
    assert ingests["cam0"].streams[("s", "cam0")].clock.resets == 1
    assert summary(closed) == [(k, ALL, []) for k in range(20)]
    assert_means_in_place(closed)


def test_a_source_that_dies_and_returns_is_dropped_then_back():
    events = [e for name in ("mic0", "asr0") for e in stream(name, 12.0)]
    events += stream("cam0", 4.0) + stream("cam0", 12.0, start=7.0, seq0=70)  # 30 frames lost
    closed, ingests, _ = run(events)
    expected = [(k, ALL, []) for k in range(4)] + [(k, ["audio", "text"], ["cam0"]) for k in (4, 5, 6)] + \
               [(k, ALL, []) for k in range(7, 12)]
    assert summary(closed) == expected
    assert ingests["cam0"].streams[("s", "cam0")].seq_gaps == 30


def test_a_source_that_restarts_on_a_new_clock_is_mapped_again():
    # the camera crashes at 4 s, restarts at 7 s with seq and clock from 0
    events = [e for name in ("mic0", "asr0") for e in stream(name, 12.0)]
    events += stream("cam0", 4.0) + stream("cam0", 12.0, start=7.0, clock=lambda s: s - 7.0)
    closed, ingests, _ = run(events)
    assert [k for k, present, _ in summary(closed) if present == ALL] == [0, 1, 2, 3, 7, 8, 9, 10, 11]
    assert_means_in_place(closed)
    assert ingests["cam0"].streams[("s", "cam0")].clock.resets == 1


def test_late_data_is_counted_and_within_the_allowed_lateness_revises_the_window():
    # the camera's network stalls: its frames from 2.0 s on arrive together at 4.7 s, after windows 2 and 3
    # closed without it (it was silent long enough to count as dropped)
    events = [e for name in SENSORS for e in stream(name, 6.0)]
    stalled = [(max(at, START + 4.7) if name == "cam0" and m.t >= 2.0 else at, name, m) for at, name, m in events]
    closed, _, aligner = run(stalled, lateness=2.0)
    first = {w.window_id: w for w in closed if not w.revision}
    assert first[2].dropped == ["cam0"] and first[3].dropped == ["cam0"]
    revised = {w.window_id: w for w in closed if w.revision}
    assert sorted(revised) == [2, 3] and all(w.present == ALL and w.revision == 1 for w in revised.values())
    assert_means_in_place(revised.values())
    late_frames = {k: sum(1 for at, name, m in stalled if name == "cam0" and m.kind == "data" and k <= m.t < k + 1
                          and at >= START + 4.7) for k in (2, 3)}  # the camera's messages in each 1 s window
    assert all(late_frames.values())
    assert {k: w.late for k, w in revised.items()} == {k: {"visual": n} for k, n in late_frames.items()}
    assert aligner.counts["revised"] == 2 and aligner.counts["late"] == sum(late_frames.values())  # messages
    closed, _, aligner = run(stalled)  # no allowed lateness: counted, not merged
    assert aligner.counts["late"] == sum(late_frames.values()) and not any(w.revision for w in closed)


def test_a_watermark_bound_waits_for_sources_that_deliver_out_of_order():
    # the camera announces 3.05 s (a heartbeat) before its frames for [2.5, 3.0) arrive
    events = [e for name in ("mic0", "asr0") for e in stream(name, 6.0)]
    cam = stream("cam0", 6.0)
    early = [(at, name, m) for at, name, m in cam if m.t < 2.5]
    held = [(START + 3.07 + i * 0.01, name, m) for i, (_, name, m) in enumerate(e for e in cam if 2.5 <= e[2].t < 3)]
    beat = (START + 3.06, "cam0", wire.SensorMessage("s", "cam0", "visual", 0, 3.05, kind="heartbeat"))
    later = [(at, name, m) for at, name, m in cam if m.t >= 3.0]
    ordered = early + [beat] + held + later  # renumber seq in sending order
    events += [(at, name, wire.SensorMessage(**{**{f: getattr(m, f) for f in m.__slots__}, "seq": i}))
               for i, (at, name, m) in enumerate(ordered)]
    _, _, aligner = run(events)
    assert aligner.counts["late"] > 0  # window 2 closed on the heartbeat's word
    closed, ingests, aligner = run(events, bound=0.5)
    assert aligner.counts["late"] == 0 and summary(closed) == [(k, ALL, []) for k in range(6)]
    assert_means_in_place(closed)


def asr(utterances, until, session="s", clock=lambda s: s, source="asr0"):
    """A speech recogniser: each utterance (start, end) one text segment sent when it ends, valued [start, start];
    heartbeats every 0.25 s in between, until `until`; stamped by its own `clock`."""
    events, seq = [], 0
    marks = sorted([(end, (start, end)) for start, end in utterances] +
                   [(float(t), None) for t in np.arange(0.25, until + 1e-9, 0.25)], key=lambda m: m[0])
    for at, utterance in marks:
        if utterance is None:
            message = wire.SensorMessage(session, source, "text", seq, clock(at), kind="heartbeat")
        else:
            start, end = utterance
            message = wire.features_message(session, source, "text", seq, clock(start), np.full(2, start),
                                            duration=end - start)
        events.append((START + at + 0.005, "asr0", message))  # both recognisers publish to sensor asr0
        seq += 1
    return events


def test_utterance_windows_follow_the_text_segments_and_tile_the_time_once_the_recogniser_dies():
    spans = [(0.0, 1.3), (1.3, 4.0), (4.5, 5.2)]
    events = [e for name in ("cam0", "mic0") for e in stream(name, 10.0)] + asr(spans, until=6.0)
    closed, _, aligner = run(events, slot=0.1)
    windows = [(w.window_id, round(w.start, 6), round(w.end, 6), w.present) for w in closed]
    after = [(5.2, 6.2), (6.2, 7.2), (7.2, 8.2), (8.2, 9.2), (9.2, 10.2)]  # recogniser gone: 1 s windows
    assert windows == [(i, a, b, ALL) for i, (a, b) in enumerate(spans)] + \
                      [(i + 3, a, b, ["audio", "visual"]) for i, (a, b) in enumerate(after)]
    for w in closed:
        middle = (w.start + min(w.end, 10.0)) / 2
        assert abs(w.features["visual"][0] + 0.05 - middle) < 0.1 and abs(w.features["audio"][0] + 0.05 - middle) < 0.1
        if "text" in w.features:
            assert w.features["text"][0] == pytest.approx(w.start, abs=0.05)
    assert aligner.counts["late"] == 0


def test_utterances_of_a_recogniser_on_another_clock_wait_for_its_clock_and_land_in_session_time():
    spans = [(1.0, 2.5), (3.0, 6.0), (6.5, 9.0)]
    events = [e for name in ("cam0", "mic0") for e in stream(name, 10.0)]
    events += [(at + 0.02, name, m) for at, name, m in asr(spans, until=10.0, clock=lambda s: s + 3600.0)]
    closed, _, aligner = run(events, slot=0.1)
    utterances = [(w.start, w.end) for w in closed if "text" in w.present]  # its extra 20 ms of delay reads as
    assert np.allclose(utterances, spans, atol=0.025) and aligner.counts["late"] == 0  # clock offset, as in LSL
    assert all(w.features["text"][0] == pytest.approx(w.start, abs=0.05) for w in closed if "text" in w.present)


def test_session_time_stays_the_clock_of_the_first_stream_heard():
    # the recogniser (session clock) is heard first, by a heartbeat; the microphone, 10 s behind, has its clock
    # learned first (it sends 10 times as often): the microphone is mapped, the recogniser stays as it is
    hello = (START + 0.01, "asr0", wire.SensorMessage("s", "asr0", "text", 0, 0.0, kind="heartbeat"))
    events = [hello] + stream("asr0", 12.0, seq0=1) + stream("cam0", 12.0, start=2.0)
    events += [(at + 0.05, name, m) for at, name, m in stream("mic0", 12.0, clock=lambda s: s - 10.0)]
    closed, _, aligner = run(events)
    assert [k for k, present, _ in summary(closed) if present == ALL] == list(range(2, 12))
    assert aligner.counts["late"] == 0
    assert_means_in_place(closed)


def test_streams_on_one_clock_stay_unshifted_while_their_clock_lines_are_first_fitted():
    # every sensor sends a heartbeat for t=k at k+0.5 and the data of [k, k+1) at k+1, so its first second is
    # seen only through a heartbeat half a second late: a line fitted to four seconds takes that for a steep
    # drift. The recogniser, heard first (the session clock), reports its fifth second after the others
    events = []
    for i, name in enumerate(["asr0", "cam0", "mic0"]):
        for k in range(10):
            beat = wire.SensorMessage("s", name, SENSORS[name], 2 * k, float(k), kind="heartbeat")
            data = wire.features_message("s", name, SENSORS[name], 2 * k + 1, float(k), np.full(2, k + 0.5),
                                         duration=1.0)
            lag = 0.3 if (name, k) == ("asr0", 3) else 0.0
            events += [(START + k + 0.5 + i * 0.001, name, beat), (START + k + 1.005 + lag, name, data)]
    closed, _, aligner = run(events)
    assert summary(closed) == [(k, ALL, []) for k in range(10)] and aligner.counts["late"] == 0
    assert all(vector[0] == w.start + 0.5 for w in closed for vector in w.features.values())


def test_a_sensor_that_finishes_a_replay_first_waits_for_the_others():
    from mmfuse.frames import SensorBatch, StreamProgress

    aligner = Aligner(["audio", "visual"], {"mic0": "audio", "cam0": "visual"}, 1.0, 1.0, 1.0)
    ticks = AlignerTicks(aligner, ["mic0", "cam0"])
    progress = SensorBatch("mic0", [], [StreamProgress("s", "mic0", "audio", 0.5, 0.5, 0.0, False, 0)])
    assert ticks.report("mic0", Tick(1.0, final=True), progress, replay=0) == ([], False)
    assert ticks.report("mic0", Tick(0.0), None, replay=1) == ([], False)  # the next replay, early: kept
    _, over = ticks.report("cam0", Tick(1.0, final=True), None, replay=0)
    assert over and ticks.replay == 1 and ticks.reached["mic0"] == 0.0  # replayed into the next one


@pytest.mark.parametrize("speed, seconds", [(2, 2.0), (10, 20.0)])
def test_a_replay_faster_than_real_time_keeps_every_stream_in_its_windows(speed, seconds):
    # mmfuse-replay --speed N without the virtual clock: every clock seems to run N times fast
    events = [(START + (at - START) / speed, name, m) for name in SENSORS for at, name, m in stream(name, seconds)]
    closed, _, aligner = run(events)
    assert summary(closed) == [(k, ALL, []) for k in range(int(seconds))] and aligner.counts["late"] == 0
    assert_means_in_place(closed)


def test_streams_on_another_clock_are_mapped_even_if_the_first_stream_heard_never_learns_its_clock():
    hello = (START + 0.01, "asr0", wire.SensorMessage("s", "asr0", "text", 0, 0.0, kind="heartbeat"))  # then dies
    events = [hello] + [(at, name, m) for name in ("cam0", "mic0")
                        for at, name, m in stream(name, 12.0, clock=lambda s: s - 10.0)]
    closed, _, _ = run(events)
    assert [k for k, present, _ in summary(closed)] == list(range(12))
    assert all(present == ["audio", "visual"] for _, present, _ in summary(closed))
    assert_means_in_place(closed)


def test_overlapping_segments_of_two_recognisers_are_each_a_whole_window():
    events = [e for name in ("cam0", "mic0") for e in stream(name, 9.0)]
    events += asr([(0.0, 2.0), (4.0, 8.0)], until=9.0) + asr([(2.0, 5.0)], until=9.0, source="asr1")
    closed, _, _ = run(events, slot=0.1)
    assert [(round(w.start, 6), round(w.end, 6)) for w in closed if "text" in w.present] == \
        [(0.0, 2.0), (2.0, 5.0), (4.0, 8.0)]


def test_messages_lost_before_the_daemon_are_named_in_the_windows_they_were_lost_from():
    # the camera's messages 23-25 (t 2.3-2.5 s) never arrive; its seq says three are missing
    events = [e for name in SENSORS for e in stream(name, 5.0)]
    lost = [(at, name, m) for at, name, m in events if not (name == "cam0" and 23 <= m.seq <= 25)]
    closed, ingests, _ = run(lost)
    gaps = {w.window_id: w.seq_gaps for w in closed}
    assert gaps == {0: {}, 1: {}, 2: {"visual": 3}, 3: {}, 4: {}}
    assert ingests["cam0"].stats()["seq_gaps"] == 3
