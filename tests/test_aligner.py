"""Windowing rules of the aligner, driven with explicit wall-clock times."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfuse.aligner import Aligner, UtteranceAligner
from mmfuse.clocks import ClockLine
from mmfuse.frames import SensorBatch, Span, StreamProgress, WindowDelta

MODALITIES = ["audio", "text", "visual"]
SENSORS = {"mic0": "audio", "asr0": "text", "cam0": "visual"}
OFFSET = 1000.0  # daemon wall clock = sensor clock + 1000 s


def make_aligner(length=2.0, hop=2.0, timeout=1.0):
    return Aligner(MODALITIES, SENSORS, length, hop, timeout, session_idle_s=30.0)


def utterance(source, window, session="s1", value=1.0, dim=3, ended=False, arrive_late=0.0, length=2.0):
    """What a sensor sends for one window: its sum, and progress to the window's end."""
    end = (window + 1) * length
    delta = WindowDelta(session, source, SENSORS[source], window, np.full(dim, value, np.float32), 1.0, 1)
    progress = StreamProgress(session, source, SENSORS[source], end, OFFSET + end + arrive_late, OFFSET, ended, 0)
    return SensorBatch(source, [delta], [progress])


def heartbeat(source, t, session="s1", ended=False):
    return SensorBatch(source, [], [StreamProgress(session, source, SENSORS[source], t, OFFSET + t, OFFSET, ended, 0)])


def feed_window(aligner, window, sources=SENSORS, session="s1"):
    for source in sources:
        aligner.push(utterance(source, window, session=session))


def test_complete_window_closes_once_every_stream_passed_its_end():
    aligner = make_aligner()
    aligner.push(utterance("mic0", 0))
    aligner.push(utterance("asr0", 0))
    assert aligner.poll(OFFSET + 2.0) == []  # cam0 not heard from yet, still within the drop timeout
    aligner.push(utterance("cam0", 0))
    (window,) = aligner.poll(OFFSET + 2.0)
    assert (window.window_id, window.start, window.end) == (0, 0.0, 2.0)
    assert window.complete and window.present == MODALITIES and window.dropped == []
    assert aligner.poll(OFFSET + 2.5) == []


def test_silent_stream_is_dropped_after_the_timeout():
    aligner = make_aligner()
    feed_window(aligner, 0)
    assert len(aligner.poll(OFFSET + 2.0)) == 1
    feed_window(aligner, 1, sources=["mic0", "asr0"])  # the camera, last heard at 1002.0, died
    assert aligner.poll(OFFSET + 2.99) == []
    (window,) = aligner.poll(OFFSET + 3.01)
    assert window.window_id == 1 and window.missing == ["visual"] and window.dropped == ["cam0"]
    feed_window(aligner, 2, sources=["mic0", "asr0"])  # now cam0 is known dropped: no waiting any more
    (window,) = aligner.poll(OFFSET + 6.0)
    assert window.window_id == 2 and window.missing == ["visual"] and window.dropped == ["cam0"]


def test_live_but_lagging_stream_is_waited_for_until_end_plus_timeout():
    aligner = make_aligner()
    feed_window(aligner, 0, sources=["mic0", "asr0"])
    for now in (1.5, 2.3, 2.9):  # the camera keeps sending heartbeats, but only up to t=1.0
        aligner.push(SensorBatch("cam0", [], [StreamProgress("s1", "cam0", "visual", 1.0, OFFSET + now, OFFSET,
                                                             False, 0)]))
        assert aligner.poll(OFFSET + now) == []
    (window,) = aligner.poll(OFFSET + 3.01)  # end 2.0 + offset + timeout 1.0
    assert window.missing == ["visual"] and window.dropped == ["cam0"]


def test_source_that_returns_is_live_again():
    aligner = make_aligner()
    feed_window(aligner, 0)
    feed_window(aligner, 1, sources=["mic0", "asr0"])
    feed_window(aligner, 2, sources=["mic0", "asr0"])
    closed = aligner.poll(OFFSET + 3.5)
    assert [w.window_id for w in closed] == [0, 1, 2]
    assert "cam0" in aligner.sessions["s1"].dropped
    feed_window(aligner, 3)
    (window,) = aligner.poll(OFFSET + 8.0)
    assert window.complete and window.dropped == []
    assert "cam0" not in aligner.sessions["s1"].dropped


def test_late_data_for_a_closed_window_is_counted_not_merged():
    aligner = make_aligner()
    feed_window(aligner, 0, sources=["mic0", "asr0"])
    aligner.push(heartbeat("cam0", 2.0))  # camera alive but sent nothing for window 0
    (window,) = aligner.poll(OFFSET + 2.0)
    assert window.missing == ["visual"] and window.dropped == []
    aligner.push(utterance("cam0", 0))
    assert aligner.counts["late"] == 1
    assert aligner.poll(OFFSET + 2.1) == []


def test_ended_stream_is_named_in_later_windows_only():
    aligner = make_aligner()
    feed_window(aligner, 0, sources=["mic0", "asr0"])
    aligner.push(utterance("cam0", 0, ended=True))
    (window,) = aligner.poll(OFFSET + 2.0)
    assert window.complete and window.dropped == []
    feed_window(aligner, 1, sources=["mic0", "asr0"])
    (window,) = aligner.poll(OFFSET + 4.0)  # no wait for a stream that said `end`
    assert window.dropped == ["cam0"] and window.missing == ["visual"]


def test_windows_without_any_data_give_no_decision():
    aligner = make_aligner()
    feed_window(aligner, 0)
    for source in SENSORS:
        aligner.push(heartbeat(source, 4.0))
    feed_window(aligner, 2)
    assert [w.window_id for w in aligner.poll(OFFSET + 6.0)] == [0, 2]
    assert aligner.counts["empty"] == 1


def test_sessions_are_independent():
    aligner = make_aligner()
    feed_window(aligner, 0, session="a")
    feed_window(aligner, 0, session="b")
    feed_window(aligner, 1, session="a", sources=["mic0", "asr0"])
    feed_window(aligner, 1, session="b")
    closed = aligner.poll(OFFSET + 2.5)
    assert [(w.session, w.window_id) for w in closed] == [("a", 0), ("b", 0), ("b", 1)]
    (late,) = aligner.poll(OFFSET + 3.1)
    assert (late.session, late.window_id, late.dropped) == ("a", 1, ["cam0"])


def test_sliding_windows_share_data():
    aligner = Aligner(MODALITIES, {"mic0": "audio"}, 2.0, 1.0, 1.0)
    for k in (-1, 0):
        aligner.push(SensorBatch("mic0", [WindowDelta("s", "mic0", "audio", k, np.ones(2, np.float32), 1.0, 1)], []))
    aligner.push(heartbeat("mic0", 1.0, session="s"))
    assert [w.window_id for w in aligner.poll(OFFSET + 1.0)] == [-1]
    aligner.push(heartbeat("mic0", 2.0, session="s"))
    assert [w.window_id for w in aligner.poll(OFFSET + 2.0)] == [0]


def test_drain_closes_every_open_window():
    aligner = make_aligner()
    feed_window(aligner, 0, sources=["mic0"])
    closed = aligner.drain(OFFSET + 0.5)
    assert [(w.window_id, w.present) for w in closed] == [(0, ["audio"])]
    assert aligner.sessions == {}


def test_window_features_are_weighted_means():
    aligner = make_aligner()
    batch = SensorBatch("mic0", [WindowDelta("s1", "mic0", "audio", 0, np.full(3, 6.0, np.float32), 3.0, 3)],
                        [StreamProgress("s1", "mic0", "audio", 2.0, OFFSET + 2.0, OFFSET, False, 0)])
    aligner.push(batch)
    aligner.push(SensorBatch("mic0", [WindowDelta("s1", "mic0", "audio", 0, np.full(3, 2.0, np.float32), 1.0, 1)], []))
    (window,) = aligner.drain(OFFSET + 2.0)
    np.testing.assert_allclose(window.features["audio"], [2.0, 2.0, 2.0])


def test_unconfigured_source_of_a_configured_modality_stands_in_for_its_sensor():
    aligner = make_aligner()
    feed_window(aligner, 0, sources=["mic0", "asr0"])
    delta = WindowDelta("s1", "cam-left", "visual", 0, np.ones(3, np.float32), 1.0, 1)
    aligner.push(SensorBatch("cam0", [delta], [StreamProgress("s1", "cam-left", "visual", 2.0, OFFSET + 2.0, OFFSET,
                                                              False, 0)]))
    (window,) = aligner.poll(OFFSET + 2.0)
    assert window.complete and window.dropped == []


def test_sensor_never_heard_from_is_waited_for_then_named():
    aligner = make_aligner()
    feed_window(aligner, 0, sources=["mic0", "asr0"])
    assert aligner.poll(OFFSET + 2.5) == []
    (window,) = aligner.poll(OFFSET + 3.01)
    assert window.missing == ["visual"] and window.dropped == ["cam0"]


def test_a_stream_with_a_learned_period_is_dropped_after_k_periods_not_the_timeout():
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, period_factor=5, flush_s=0.05)
    fixed = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0)
    for t in np.arange(0.0, 1.0, 0.04):  # a 25 Hz camera that stops at t = 0.96
        progress = StreamProgress("s1", "cam0", "visual", t, OFFSET + t, OFFSET, False, 0, period=0.04)
        aligner.push(SensorBatch("cam0", [], [progress]))
        fixed.push(SensorBatch("cam0", [], [progress]))
    last = OFFSET + 0.96
    aligner.poll(last + 0.24)
    fixed.poll(last + 0.24)
    assert "cam0" not in aligner.sessions["s1"].dropped  # within 0.05 + 5 * 0.04 = 0.25 s of silence
    aligner.poll(last + 0.26)
    fixed.poll(last + 0.26)
    assert "cam0" in aligner.sessions["s1"].dropped and "cam0" not in fixed.sessions["s1"].dropped
    fixed.poll(last + 1.01)
    assert "cam0" in fixed.sessions["s1"].dropped
    # an unknown period (too few arrivals) falls back to the timeout
    assert aligner.silence_limit(StreamProgress("s1", "mic0", "audio", 0, 0, 0, False, 0)) == 1.0


def test_a_fast_stream_is_dropped_after_min_silence_not_a_few_of_its_short_periods():
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, period_factor=5, flush_s=0.05, min_silence_s=0.1)
    fast = StreamProgress("s1", "mic0", "audio", 0, 0, 0, False, 0, period=0.005)  # 200 Hz: 5 periods are 25 ms
    slow = StreamProgress("s1", "cam0", "visual", 0, 0, 0, False, 0, period=0.04)
    assert aligner.silence_limit(fast) == 0.05 + 0.1 and aligner.silence_limit(slow) == 0.05 + 0.2


def test_a_live_sensors_streams_are_judged_on_its_latest_account_so_a_sensor_behind_drops_nothing():
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, period_factor=5, flush_s=0.05)
    for t in np.arange(0.0, 1.0, 0.04):  # a 25 Hz camera whose sensor actor reports every 40 ms, until t = 0.96
        progress = StreamProgress("s1", "cam0", "visual", t, OFFSET + t, OFFSET, False, 0, period=0.04)
        aligner.push(SensorBatch("cam0", [], [progress], as_of=OFFSET + t))
    last = OFFSET + 0.96
    aligner.poll(last + 0.6)  # the actor is behind (its reports stopped), not the camera: nothing dropped yet
    assert "cam0" not in aligner.sessions["s1"].dropped
    aligner.poll(last + 1.01)  # ... until its latest account is as old as the drop timeout
    assert "cam0" in aligner.sessions["s1"].dropped

    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, period_factor=5, flush_s=0.05)
    for t in np.arange(0.0, 1.0, 0.04):
        aligner.push(SensorBatch("cam0", [], [StreamProgress("s1", "cam0", "visual", t, OFFSET + t, OFFSET, False,
                                                             0, period=0.04)], as_of=OFFSET + t))
    aligner.push(SensorBatch("cam0", [], [], as_of=last + 0.19))  # the actor says: no news of the camera
    aligner.poll(last + 0.2)
    assert "cam0" not in aligner.sessions["s1"].dropped  # 0.19 s silent when last told: within 5 periods
    aligner.push(SensorBatch("cam0", [], [], as_of=last + 0.21))
    aligner.poll(last + 0.22)
    assert "cam0" in aligner.sessions["s1"].dropped  # the camera, silent for more than 5 * 0.04 s by then


def test_a_dead_sensor_actors_streams_are_silent_at_once_and_its_next_lifes_data_brings_them_back():
    def batch(source, window, t, incarnation, data=True):
        delta = [WindowDelta("s1", source, SENSORS[source], window, np.ones(3, np.float32), 1.0, 1)] if data else []
        progress = [StreamProgress("s1", source, SENSORS[source], t, OFFSET + t, OFFSET, False, 0)] if data else []
        return SensorBatch(source, delta, progress, incarnation=incarnation, as_of=OFFSET + t)

    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 3.0, flush_s=0.05)
    for source in SENSORS:
        aligner.push(batch(source, 0, 2.0, "first"))
    assert len(aligner.poll(OFFSET + 2.0)) == 1
    aligner.push(batch("cam0", 0, 3.9, "first", data=False))  # its actor is alive, the camera sends 2 s windows
    for source in ("mic0", "asr0"):  # window 1's camera data died with its sensor actor
        aligner.push(batch(source, 1, 4.0, "first"))
    assert aligner.poll(OFFSET + 4.0) == []  # the camera's actor is only late, as far as anyone knows
    aligner.lose_sensor("cam0", "first")
    aligner.push(batch("cam0", 0, 3.95, "first", data=False))  # a call of the dead life, come late: no news
    (window,) = aligner.poll(OFFSET + 4.01)  # not the drop timeout later: it is known what became of them
    assert window.window_id == 1 and window.missing == ["visual"] and window.dropped == ["cam0"]
    aligner.push(batch("cam0", 2, 6.0, "second", data=False))  # the next life is up, the camera not heard yet
    assert "cam0" in aligner.sessions["s1"].dropped
    for source in SENSORS:
        aligner.push(batch(source, 2, 6.0, "second" if source == "cam0" else "first"))
    (window,) = aligner.poll(OFFSET + 6.0)
    assert window.present == MODALITIES and window.dropped == []
    assert "cam0" not in aligner.sessions["s1"].dropped


@pytest.mark.parametrize("restart", [6, 2])  # after it learned its clock, and before it ever had
def test_while_the_session_clocks_stream_learns_its_clock_again_after_a_restart_no_other_stream_is_moved(restart):
    """Session time is the first stream's clock. A restarted sensor actor learns its streams' clocks anew (its
    line takes two windows here), and a young estimate is off by its first arrivals' delays: the other streams
    must not be moved by it."""
    line = ClockLine(OFFSET, 0.0)

    def report(source, window, offset, learnt, incarnation="first"):
        t = (window + 1) * 2.0
        delta = WindowDelta("s1", source, SENSORS[source], window, np.full(3, window, np.float32), 1.0, 1)
        progress = StreamProgress("s1", source, SENSORS[source], t, OFFSET + t, offset, False, 0,
                                  line=line if learnt else None)
        aligner.push(SensorBatch(source, [delta], [progress], incarnation=incarnation))

    aligner = make_aligner()
    for window in range(10):  # cam0 heard first: its clock is session time
        if window < restart:
            report("cam0", window, OFFSET, learnt=window >= 2)
        else:  # its actor restarted: until it has learnt, its estimate, from its first arrivals, is 0.5 s off
            learnt = window >= restart + 2
            report("cam0", window, OFFSET if learnt else OFFSET + 0.5, learnt, incarnation="second")
        for source in ("mic0", "asr0"):
            report(source, window, OFFSET, learnt=window >= 2)
        (closed,) = aligner.poll(OFFSET + (window + 1) * 2.0)
        assert closed.window_id == window and closed.present == MODALITIES
        assert all(vector[0] == window for vector in closed.features.values())
    assert aligner.sessions["s1"].shifts.get("asr0", 0.0) == 0.0 and aligner.counts["late"] == 0


def test_a_sensor_actor_taken_for_dead_that_answers_again_is_heard_again():
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 3.0, flush_s=0.05)

    def account(t, incarnation="first"):
        progress = StreamProgress("s1", "cam0", "visual", t, OFFSET + t, OFFSET, False, 0)
        aligner.push(SensorBatch("cam0", [], [progress], incarnation=incarnation, as_of=OFFSET + t))
        aligner.poll(OFFSET + t)
        return "cam0" not in aligner.sessions["s1"].dropped

    assert account(1.0)
    aligner.lose_sensor("cam0", "first")  # silent on its node for a while: taken for dead
    assert not account(1.5)
    aligner.regain_sensor("cam0", "second")  # not the life taken for dead: nothing changes
    assert not account(2.0)
    aligner.regain_sensor("cam0", "first")
    assert account(2.5)


def test_a_sensor_behind_its_socket_accounts_as_of_its_last_empty_socket_so_unread_streams_are_not_silent():
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, period_factor=5, flush_s=0.05)

    def frame(session, t, arrived):
        return StreamProgress(session, "cam0", "visual", t, OFFSET + arrived, OFFSET, False, 0, period=0.04)

    for t in np.arange(0.0, 1.0, 0.04):  # one actor, two 25 Hz cameras, up to date
        aligner.push(SensorBatch("cam0", [], [frame("s1", t, t), frame("s2", t, t)], as_of=OFFSET + t,
                                 taken_at=OFFSET + t))
    for now in np.arange(1.0, 2.5, 0.05):  # behind its socket from 0.96: it reads s1's frames, s2's wait unread
        aligner.push(SensorBatch("cam0", [], [frame("s1", now - 0.5, now)], as_of=OFFSET + 0.96,
                                 taken_at=OFFSET + now))
        aligner.poll(OFFSET + now)
        assert not aligner.sessions["s2"].dropped  # its last frame came as late as the account is: not silent
    aligner.push(SensorBatch("cam0", [], [frame("s2", 2.0, 2.5)], as_of=OFFSET + 2.5, taken_at=OFFSET + 2.5))
    aligner.poll(OFFSET + 2.5)  # the backlog read, the socket empty at 2.5
    assert not aligner.sessions["s1"].dropped and not aligner.sessions["s2"].dropped
    aligner.push(SensorBatch("cam0", [], [frame("s2", 2.8, 2.8)], as_of=OFFSET + 2.8, taken_at=OFFSET + 2.8))
    aligner.poll(OFFSET + 2.8)  # s1 sent nothing since 2.45, by an account as of when nothing waited: silent
    assert "cam0" in aligner.sessions["s1"].dropped and not aligner.sessions["s2"].dropped
    aligner.poll(OFFSET + 3.9)  # and an actor that sends nothing for the drop timeout drops all it reports
    assert "cam0" in aligner.sessions["s2"].dropped


def test_a_modality_with_too_few_of_its_expected_frames_counts_as_missing():
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, min_share=0.5)
    for source, frames in (("mic0", 50), ("asr0", 2), ("cam0", 10)):  # cam0: 10 of 50 frames at 25 Hz
        delta = WindowDelta("s1", source, SENSORS[source], 0, np.ones(3, np.float32), 1.0, frames)
        period = {"mic0": 0.04, "asr0": 1.0, "cam0": 0.04}[source]
        aligner.push(SensorBatch(source, [delta], [StreamProgress("s1", source, SENSORS[source], 2.0, OFFSET + 2.0,
                                                                  OFFSET, False, 0, period=period)]))
    (window,) = aligner.poll(OFFSET + 2.0)
    assert window.present == ["audio", "text"] and window.missing == ["visual"]


def closed_summary(windows):
    return [(w.session, w.window_id, w.seq, w.revision, sorted(w.missing), w.dropped, dict(w.late),
             {m: f.tolist() for m, f in w.features.items()}) for w in windows]


def aligner_with_history():
    """Two sessions, a closed window kept for late data, an open one, a dropped camera."""
    aligner = Aligner(MODALITIES, SENSORS, 2.0, 2.0, 1.0, session_idle_s=30.0, lateness_s=4.0)
    for session in ("s1", "s2"):
        feed_window(aligner, 0, sources=["mic0", "asr0"], session=session)
        aligner.push(heartbeat("cam0", 2.0, session=session))
    aligner.poll(OFFSET + 2.0)
    feed_window(aligner, 1, sources=["mic0"])
    return aligner


def in_run(batch: SensorBatch, run: int) -> SensorBatch:
    for item in (*batch.deltas, *batch.progress):
        item.run = run
    return batch


def stranger(t: float, session="s1") -> SensorBatch:
    """A heartbeat from a source no configured sensor is named after, on cam0's socket."""
    return SensorBatch("cam0", [], [StreamProgress(session, "cam9", "visual", t, OFFSET + t, OFFSET, False, 0)])


def test_a_later_run_of_a_sessions_own_stream_begins_its_next_life():
    aligner = make_aligner()
    feed_window(aligner, 0)
    feed_window(aligner, 1, sources=["mic0", "asr0"])
    assert [w.window_id for w in aligner.poll(OFFSET + 2.0)] == [0]
    aligner.push(in_run(utterance("cam0", 0), 5))  # cam0's sensor actor: its stream began run 5
    old, new = aligner.poll(OFFSET + 4.0)
    assert (old.epoch, old.window_id, old.missing) == (0, 1, ["visual"])  # closed with what it had
    assert (new.epoch, new.window_id, new.present) == (1, 0, ["visual"]) and aligner.counts["stale_run"] == 0


def test_one_message_from_a_new_source_of_a_later_run_leaves_a_live_session_as_it_is():
    aligner = make_aligner()
    feed_window(aligner, 0)
    assert len(aligner.poll(OFFSET + 2.0)) == 1
    aligner.push(in_run(stranger(2.5), 999))
    feed_window(aligner, 1)
    (window,) = aligner.poll(OFFSET + 4.0)
    assert (window.epoch, window.window_id, window.present, window.dropped) == (0, 1, MODALITIES, [])
    aligner.poll(OFFSET + 4.6)  # kept for twice the drop timeout, in case the session's streams began its run
    assert aligner.counts["stale_run"] == 1


def test_a_new_run_that_adds_a_source_keeps_what_the_source_sent_before_the_sessions_own_streams_began_it():
    def replayed(again: bool):
        aligner, shift = make_aligner(), 4.5 if again else 0.0
        if again:  # run 1 of mic0 and cam0, still live when run 2 begins
            for k in range(3):
                for source in ("mic0", "cam0"):
                    aligner.push(in_run(utterance(source, k), 1))
                aligner.poll(OFFSET + 2.0 * (k + 1))
        closed = []
        for k in range(3):  # run 2 adds asr0, heard first: the sensor actors hold mic0's and cam0's new run a message
            for source in ("asr0", "mic0", "cam0"):
                batch = in_run(utterance(source, k, arrive_late=shift), 2)
                batch.progress[0].offset += shift
                aligner.push(batch)
            closed += aligner.poll(OFFSET + shift + 2.0 * (k + 1))
        return [(w.window_id, w.present) for w in closed if w.epoch == int(again)], aligner.counts["stale_run"]

    assert replayed(again=True) == replayed(again=False) == ([(k, MODALITIES) for k in range(3)], 0)


def test_a_session_begun_by_a_stranger_of_another_run_is_taken_over_once_nothing_of_it_is_live():
    aligner = make_aligner()
    aligner.push(in_run(stranger(0.5), 999))
    assert aligner.poll(OFFSET + 0.5) == []
    aligner.push(heartbeat("mic0", 0.9))  # run 0, while the stranger's stream is live: dropped
    assert aligner.poll(OFFSET + 0.9) == [] and aligner.counts["stale_run"] == 1
    assert aligner.poll(OFFSET + 1.6) == []  # the stranger silent past the drop timeout
    feed_window(aligner, 0)
    (window,) = aligner.poll(OFFSET + 2.0)
    assert (window.epoch, window.window_id, window.present, window.dropped) == (1, 0, MODALITIES, [])


def test_a_copy_goes_on_from_where_it_was_taken_whatever_the_original_does_after():
    original = aligner_with_history()
    taken, oracle = original.copy(), copy.deepcopy(original)
    original.push(utterance("cam0", 0, value=5.0))  # late data for the kept window 0: revised
    feed_window(original, 1, sources=["asr0", "cam0"])
    feed_window(original, 2, session="s2")
    assert original.poll(OFFSET + 6.0)
    later = [utterance("cam0", 0, session="s2", value=3.0), utterance("asr0", 1)]
    for twin in (taken, oracle):
        for batch in later:
            twin.push(batch)
    assert closed_summary(taken.poll(OFFSET + 4.0)) == closed_summary(oracle.poll(OFFSET + 4.0))
    assert closed_summary(taken.drain(OFFSET + 9.0)) == closed_summary(oracle.drain(OFFSET + 9.0))
    assert taken.counts == oracle.counts != original.counts


def containers(thing, seen=None) -> set[int]:
    """Ids of the dicts, lists and sets reachable from the aligner's own state classes, down to the records it
    replaces and never changes (progress reports, deltas, closed windows, arrays)."""
    seen = set() if seen is None else seen
    if isinstance(thing, (dict, list, set, tuple)):
        if not isinstance(thing, tuple):
            seen.add(id(thing))
        for item in (list(thing.items()) if isinstance(thing, dict) else thing):
            containers(item, seen)
    elif type(thing).__module__ in ("mmfuse.aligner", "mmfuse.delivery", "mmfuse.virtual_clock"):
        for value in vars(thing).values():
            containers(value, seen)
    return seen


def test_a_copy_shares_no_container_with_the_original():
    from mmfuse.delivery import Outbox
    from mmfuse.virtual_clock import AlignerTicks

    aligner = aligner_with_history()
    outbox = Outbox()
    outbox.add(aligner.drain(OFFSET + 9.0))
    aligner = aligner_with_history()
    ticks = AlignerTicks(aligner, list(SENSORS))
    twin = aligner.copy()
    assert not containers(aligner) & containers(twin)
    assert not containers(outbox) & containers(outbox.copy())
    assert not containers(ticks) & containers(ticks.copy(twin)) - containers(twin)


@st.composite
def live_schedules(draw):
    """Steps of a live daemon: wall time moves on by `dt` (now and then back: the wall clock set back), then sensor
    actors push (data up to now, heartbeats, heartbeats of a stream that stays behind, or nothing of the stream;
    with or without their live account), one dies now and then, and the ticker polls."""
    steps = []
    for _ in range(draw(st.integers(5, 60))):
        dt = draw(st.sampled_from([0.004, 0.01, 0.05, 0.2, 0.45, 0.9, 1.6, -0.3, -1.2]))
        pushes = draw(st.lists(st.tuples(st.sampled_from(list(SENSORS)), st.sampled_from(["s1", "s2"]),
                                         st.sampled_from(["data", "heartbeat", "lagging", "end", "silent"]),
                                         st.booleans()), max_size=4))
        steps.append((dt, pushes, draw(st.sampled_from([None, None, None, *SENSORS]))))
    return steps


@settings(deadline=None, max_examples=120)
@given(schedule=live_schedules(), utterances=st.booleans())
def test_a_ticker_that_polls_only_sessions_whose_noted_moment_has_come_closes_what_a_poll_of_all_closes(
        schedule, utterances):
    def build():
        if utterances:
            return UtteranceAligner(MODALITIES, SENSORS, 0.5, 2.0, 1.0, session_idle_s=6.0, period_factor=3.0)
        return Aligner(MODALITIES, SENSORS, 2.0, 1.0, 1.0, session_idle_s=6.0, lateness_s=1.5, period_factor=3.0,
                       flush_s=0.2, min_silence_s=0.3)

    every, due, t = build(), build(), 0.0
    reached = {(s, n): 0.0 for s in SENSORS for n in ("s1", "s2")}
    for dt, pushes, lost in schedule:
        for tick in np.arange(OFFSET + t, OFFSET + t + dt, 0.01)[1:]:  # the ticker, until this step
            assert same(due.poll(tick, due_only=True), every.poll(tick), due, every)
        t += dt
        now = OFFSET + t
        if dt < 0:  # the ticker's first poll after the clock was set back
            assert same(due.poll(now, due_only=True), every.poll(now), due, every)
        for source, session, kind, accounts in pushes:
            if kind == "silent":  # the actor answers, with nothing of this stream
                batch = SensorBatch(source, [], [])
            elif kind == "lagging":  # heard now, still at where it was
                batch = SensorBatch(source, [], [StreamProgress(session, source, SENSORS[source],
                                                                reached[source, session], now, OFFSET, False, 0)])
            else:
                start, reached[source, session] = reached[source, session], t
                deltas = [WindowDelta(session, source, SENSORS[source], k, np.ones(3, np.float32), 1.0, 1)
                          for k in range(int(start // 1.0), int(t // 1.0) + 1)] if kind == "data" else []
                batch = SensorBatch(source, deltas, [StreamProgress(session, source, SENSORS[source], t, now,
                                                                    OFFSET, kind == "end", 0, period=0.1)],
                                    spans=[Span(session, source, start, t)] if source == "asr0" and deltas else [])
            if accounts:
                batch.as_of = batch.taken_at = now
            for aligner in (every, due):
                aligner.push(copy.deepcopy(batch))
            assert same(due.poll(now), every.poll(now), due, every)  # as the actor polls after a push
        if lost is not None:
            for aligner in (every, due):
                aligner.lose_sensor(lost, "")


def same(due_closed, every_closed, due, every) -> bool:
    """Whether both aligners closed the same windows and see every stream and session alike."""
    def closed(windows):
        return [(w.session, w.window_id, w.revision, w.present, w.missing, w.dropped) for w in windows]

    return (closed(due_closed) == closed(every_closed) and due.stream_states() == every.stream_states()
            and due.take_finished() == every.take_finished() and due.stats() == every.stats())


def test_a_ticker_that_polls_only_due_sessions_closes_a_window_at_the_deadline_of_a_stream_that_stays_behind():
    aligner = make_aligner(length=2.0, hop=1.0)
    for source, reached in (("mic0", 2.5), ("asr0", 2.5), ("cam0", 1.5)):  # cam0 heard at 2.5, still at 1.5
        deltas = [WindowDelta("s1", source, SENSORS[source], k, np.ones(3, np.float32), 1.0, 1)
                  for k in range(int(reached) + 1)]
        aligner.push(SensorBatch(source, deltas, [StreamProgress("s1", source, SENSORS[source], reached,
                                                                 OFFSET + 2.5, OFFSET, False, 0)]))
    assert aligner.poll(OFFSET + 2.5) == []
    closed = {round(tick - OFFSET, 2): [w.window_id for w in aligner.poll(tick, due_only=True)]
              for tick in np.arange(OFFSET + 2.51, OFFSET + 3.2, 0.01)}
    assert {t: ids for t, ids in closed.items() if ids} == {3.01: [0]}  # window 0: end 2.0 + timeout 1.0
