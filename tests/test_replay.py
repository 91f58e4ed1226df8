import argparse
import subprocess
import time
import sys

import msgpack
import pytest
import yaml

from conftest import free_port
from mmfuse.config import parse_config
from mmfuse.daemon.replay import FeatureRows, MediaRows, build_schedule, parse_drop, parse_kill

SENSORS = [{"name": "cam0", "modality": "visual"}, {"name": "mic0", "modality": "audio"},
           {"name": "asr0", "modality": "text"}]


def config(tmp_path=None, bundle="b"):
    raw = {"bundle": bundle, "sensors": [{**s, "endpoint": f"tcp://127.0.0.1:{free_port()}"} for s in SENSORS],
           "output": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}
    return raw


def args(**overrides):
    base = dict(speed=1.0, drop=[], kill=[], sessions=None, seed=0, held_out_by=None)
    return argparse.Namespace(**{**base, **overrides})


def decoded(schedule):
    return [(item.sensor, msgpack.unpackb(item.frames[1])) for item in sorted(schedule)]


def test_schedule_groups_rows_into_sessions_one_utterance_per_window(feature_file):
    data = FeatureRows(str(feature_file))
    schedule, truth = build_schedule(parse_config(config()), data, args(sessions=2))
    messages = decoded(schedule)
    sessions = {body["session"] for _, body in messages}
    assert len(sessions) == 2 and len(truth) == 24
    first = [body for sensor, body in messages if sensor == "cam0" and body["kind"] == "data"][:2]
    assert [(b["t"], b["duration"], b["seq"]) for b in first] == [(0.0, 2.0, 7), (0.0, 2.0, 7)]  # after 7 beats
    ends = [body for _, body in messages if body["kind"] == "end"]
    assert len(ends) == 6 and all(b["t"] == 24.0 for b in ends)


def test_drop_and_kill(feature_file):
    data = FeatureRows(str(feature_file))
    schedule, truth = build_schedule(parse_config(config()), data,
                                     args(sessions=1, drop=[("text", 0.5)], kill=[parse_kill("visual@10s")]))
    messages = decoded(schedule)
    camera = [b for s, b in messages if s == "cam0"]
    assert max(b["t"] for b in camera) < 10.0 and not any(b["kind"] == "end" for b in camera)
    text = [b for s, b in messages if s == "asr0"]
    sent = sum(b["kind"] == "data" for b in text)
    heartbeats = sum(b["kind"] == "heartbeat" for b in text)
    assert 0 < sent < len(truth) and [b["seq"] for b in text] == list(range(len(text)))
    assert heartbeats == 7 * len(truth) + (len(truth) - sent)  # alive through every utterance, lost ones too


def test_a_media_manifest_becomes_camera_frames_asr_segments_and_audio_chunks(media_manifest):
    data = MediaRows(str(media_manifest), fps=5)
    schedule, truth = build_schedule(parse_config(config()), data, args(sessions=1))
    assert set(truth.values()) <= {"negative", "neutral", "positive"} and len(truth) == 6
    by_sensor = {}
    for sensor, body in decoded(schedule):
        by_sensor.setdefault(sensor, []).append(body)
    frames = [b for b in by_sensor["cam0"] if b["kind"] == "data"]
    assert len(frames) == 6 * 10 and {b["encoding"] for b in frames} == {"jpeg"}
    assert [b["t"] for b in frames[:3]] == pytest.approx([0.0, 0.2, 0.4])
    texts = [b for b in by_sensor["asr0"] if b["kind"] == "data"]
    assert sum(b["kind"] == "heartbeat" for b in by_sensor["asr0"]) == 6 * 7  # alive while an utterance lasts
    assert len(texts) == 6 and texts[0]["encoding"] == "utf8" and texts[0]["duration"] == pytest.approx(2.0)
    chunks = [b for b in by_sensor["mic0"] if b["kind"] == "data"]
    assert len(chunks) == 6 * 20 and all(len(b["data"]) == 3200 and b["rate"] == 16000 for b in chunks)
    for bodies in by_sensor.values():
        assert [b["seq"] for b in bodies] == list(range(len(bodies)))


def test_bad_flags_are_explained():
    with pytest.raises(argparse.ArgumentTypeError, match="text:0.3"):
        parse_drop("text=0.3")
    with pytest.raises(argparse.ArgumentTypeError, match="visual@10s"):
        parse_kill("camera@10")
    for speed in ("0", "-2", "nan", "fast"):
        result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.replay", "--data", "x.npz", "--speed", speed],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "--speed takes a positive number or max" in result.stderr


def test_replay_without_daemon_fails_fast(tmp_path, feature_file):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config()))
    result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.replay", "--config", str(path), "--data",
                             str(feature_file), "--wait-s", "0.5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "is mmfuse-daemon running" in result.stderr


def test_a_real_time_replay_of_a_clean_file_marks_no_sensor_dropped(feature_file, bundle_dir):
    """The replay's messages at their due times, each sensor's a few ms later than the last (as a replay at 1x
    delivers them), through the daemon's pipeline: sensors heartbeat through each 2 s utterance, so none is
    dropped for silence before its data arrives."""
    from mmfuse.bundle import load_bundle
    from mmfuse.pipeline import InProcessPipeline

    daemon = parse_config({**config(), "bundle": str(bundle_dir), "window": {"length_s": 2.0, "hop_s": 2.0},
                           "drop": {"timeout_s": 1.0}})
    schedule, truth = build_schedule(daemon, FeatureRows(str(feature_file)), args(sessions=2))
    delay = {"cam0": 0.002, "mic0": 0.03, "asr0": 0.06}
    run = InProcessPipeline(daemon, load_bundle(bundle_dir)).run(
        sorted([(1_700_000_000.0 + item.due + delay[item.sensor], item.sensor, item.frames) for item in sorted(schedule)],
               key=lambda event: event[0]))  # (stable: a sensor's messages stay in the order it sent them)
    assert len(run.decisions) == len(truth) and not any(d.dropped or d.restored for d in run.decisions)
    assert not any(run.rejected.values()), run.rejected


def test_the_ticks_of_a_long_gap_that_can_change_nothing_are_left_out_and_the_rest_kept_on_the_same_grid():
    from mmfuse.virtual_clock import Tick, replay_ticks

    def ticks(settled_s):
        return [round(item.now, 6) if isinstance(item, Tick) else ("message", item)
                for item in replay_ticks([0.0, 1.0, 500.005, 501.0], 2.0, settled_s)]

    everything, kept = ticks(float("inf")), ticks(100.0)
    remaining = iter(everything)
    assert all(item in remaining for item in kept)  # a subsequence, in the same order
    left_out = sorted(set(everything) - set(kept))
    assert left_out == [round(k / 100, 6) for k in range(10101, 50000)]  # from 101 s to the last tick before 500


def test_a_replay_whose_clock_jumps_a_day_ahead_decides_after_the_gap_as_a_fresh_pipeline(feature_file, bundle_dir):
    """Receive times that jump a day (a wall clock stepped while recording, a corrupted log time): the replay does
    not tick through the day, and what comes after the gap is decided as a fresh pipeline decides it."""
    from mmfuse.bundle import load_bundle
    from mmfuse.pipeline import InProcessPipeline

    daemon = parse_config({**config(), "bundle": str(bundle_dir), "window": {"length_s": 2.0, "hop_s": 2.0}})
    bundle = load_bundle(bundle_dir)
    schedule, _ = build_schedule(daemon, FeatureRows(str(feature_file)), args(sessions=2))

    def at(start: float) -> list:
        return [(start + item.due + 0.002, item.sensor, item.frames) for item in sorted(schedule)]

    def summary(decisions):
        return [(d.session, d.window_id, d.label, d.present, d.restored, d.dropped, round(max(d.scores.values()), 6))
                for d in decisions]

    fresh = InProcessPipeline(daemon, bundle).run(at(1_700_086_400.0))
    both = InProcessPipeline(daemon, bundle).run(at(1_700_000_000.0) + at(1_700_086_400.0))
    assert summary(both.decisions[len(fresh.decisions):]) == summary(fresh.decisions)


def test_a_replay_into_a_pipeline_that_has_seen_its_sessions_decides_as_a_fresh_one(feature_file, bundle_dir):
    """Each replay is a new run of its sessions: replayed again into the same daemon (here its pipeline on the
    virtual clock), the sessions start a new life and get the decisions a fresh daemon gives them."""
    from mmfuse.bundle import load_bundle
    from mmfuse.daemon.replay import new_run
    from mmfuse.pipeline import InProcessPipeline

    daemon = parse_config({**config(), "bundle": str(bundle_dir), "window": {"length_s": 2.0, "hop_s": 2.0}})
    bundle = load_bundle(bundle_dir)

    def replayed(start: float) -> list:
        schedule, _ = build_schedule(daemon, FeatureRows(str(feature_file)), args(sessions=2))
        new_run(schedule)
        time.sleep(0.002)  # runs are milliseconds: the next replay's is later
        return [(start + item.due + 0.002, item.sensor, item.frames) for item in sorted(schedule)]

    def summary(decisions):
        return [(d.session, d.window_id, d.label, d.present, d.restored, d.dropped, round(max(d.scores.values()), 6))
                for d in decisions]

    first, again = replayed(1_700_000_000.0), replayed(1_700_000_100.0)
    fresh = InProcessPipeline(daemon, bundle).run(again)
    seen = InProcessPipeline(daemon, bundle).run(first + again)
    assert summary(seen.decisions[len(fresh.decisions):]) == summary(fresh.decisions)
    assert not any(sum(counts.values()) for counts in seen.rejected.values()), seen.rejected
