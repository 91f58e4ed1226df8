"""Recording a live session into MCAP and replaying it; foreign MCAP and real XDF files."""

import contextlib
import json
import re
import signal
import struct
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import pyxdf
import yaml
import zmq

from conftest import free_port
from mmfuse import wire
from mmfuse.config import parse_config
from mmfuse.daemon.replay import main as replay_main, xdf_schedule
from mmfuse.recording import RecordingError, RecordingWriter, read_recording, summarize_mcap
from mmfuse.training.data import make_synthetic
from mmfuse.training.evaluate import main as eval_main
from mmfuse.training.train import main as train_main
from test_end_to_end import DIMS, SENSORS, WINDOW, Daemon, Lab, collect


def features(session, source, seq, t, rng):
    return wire.encode(wire.features_message(session, source, SENSORS[source], seq, t,
                                             rng.normal(size=DIMS[SENSORS[source]]), duration=WINDOW))


def decision_key(d):
    return (d["session"], d["window"]["id"], d["label"], tuple(d["present"]), tuple(d["restored"]),
            tuple(d["dropped"]), tuple(sorted(d["scores"].items())))


def on_fresh_ports(config: dict) -> dict:
    """A recording's configuration for a daemon of its own (and no recorder)."""
    config = {key: value for key, value in config.items() if key != "recorder"}
    return {**config, "sensors": [{**s, "endpoint": f"tcp://127.0.0.1:{free_port()}"} for s in config["sensors"]],
            "output": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}


@contextlib.contextmanager
def daemon_listening(config: dict, path, *flags):
    """mmfuse-daemon on `config` (written to path), ready, and a subscriber to its decisions; stopped after."""
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(path, *flags)
    context = zmq.Context()
    listener = context.socket(zmq.SUB)
    listener.setsockopt(zmq.SUBSCRIBE, b"decision/")
    joined = listener.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    listener.connect(config["output"]["endpoint"])
    try:
        assert daemon.ready.wait(120), daemon.log()
        assert joined.poll(30_000), "the decision subscriber never connected"  # a replay at full speed decides
        time.sleep(0.3)  # its first window at once: a subscription still on its way would miss it
        yield daemon, listener
    finally:
        listener.disable_monitor()
        joined.close(linger=0)
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(30)
        context.destroy(linger=0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, bundle_dir):
    """A live session through the daemon, recorded by mmfuse-record from the messages the daemon accepted:
    (recording, live decisions, the daemon's accepted count per sensor)."""
    tmp_path = tmp_path_factory.mktemp("recorded")
    lab = Lab(tmp_path, bundle_dir, {"method": "mean"}, recorder={"endpoint": f"tcp://127.0.0.1:{free_port()}"},
              log={"format": "json", "stats_interval_s": 2})
    recording = tmp_path / "session.mcap"
    recorder = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.record", "--config", str(tmp_path / "lab.yaml"),
                                 "--out", str(recording), "--decisions"], stderr=subprocess.PIPE, text=True)
    try:
        lab.wait_ready()
        lines = [recorder.stderr.readline()]
        while "sensor actor(s) of the daemon connected" not in lines[-1]:
            lines.append(recorder.stderr.readline())
            assert recorder.poll() is None, "".join(lines) + recorder.stderr.read()
        rng = np.random.default_rng(5)
        seq = dict.fromkeys(SENSORS, 0)
        for w in range(6):
            for source in SENSORS:
                if source == "cam0" and w >= 3:
                    continue  # the camera dies after three windows
                lab.sockets[source].send_multipart(features("rec", source, seq[source], w * WINDOW, rng))
                seq[source] += 1
            time.sleep(WINDOW)
        for source in ("mic0", "asr0"):
            lab.sockets[source].send_multipart(wire.encode(wire.SensorMessage(
                "rec", source, SENSORS[source], seq[source], 6 * WINDOW, kind="end")))
        live = collect(lab.decisions, quiet_s=4, expect=6)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)
        lab.close()
    assert len(live) == 6 and any("visual" in d["restored"] for d in live)
    stopped = next(json.loads(line) for line in lab.daemon.lines if '"stopped"' in line)
    accepted = {name: stopped[f"sensor-{name}"]["accepted"] for name in SENSORS}
    return recording, live, accepted


def test_a_daemon_whose_recorder_is_not_running_decides_and_counts_what_went_unrecorded(tmp_path, bundle_dir):
    lab = Lab(tmp_path, bundle_dir, {"method": "mean"}, recorder={"endpoint": f"tcp://127.0.0.1:{free_port()}"},
              log={"format": "json", "stats_interval_s": 2})
    try:
        lab.wait_ready()
        rng = np.random.default_rng(6)
        for w in range(2):
            for source in SENSORS:
                lab.sockets[source].send_multipart(features("norec", source, w, w * WINDOW, rng))
            time.sleep(WINDOW)
        for source in SENSORS:
            lab.sockets[source].send_multipart(wire.encode(wire.SensorMessage(
                "norec", source, SENSORS[source], 2, 2 * WINDOW, kind="end")))
        live = collect(lab.decisions, quiet_s=4, expect=2)
    finally:
        lab.close()
    assert len(live) == 2, lab.daemon.log(100)
    stopped = next(json.loads(line) for line in lab.daemon.lines if '"stopped"' in line)
    assert all(stopped[f"sensor-{name}"]["unrecorded"] >= 2 for name in SENSORS), stopped


def test_mmfuse_record_beside_a_live_daemon_records_every_message_the_daemon_accepted(recorded):
    recording, _, accepted = recorded
    _, messages = read_recording(recording)
    assert accepted == {"cam0": 3, "mic0": 7, "asr0": 7}
    assert {name: sum(m.sensor == name for m in messages) for name in SENSORS} == accepted


def test_a_recorded_live_session_replays_to_the_same_decisions(recorded, tmp_path):
    recording, live, _ = recorded
    config, messages = read_recording(recording)
    assert len(messages) == 6 * 2 + 3 + 2 and {m.sensor for m in messages} == set(SENSORS)
    channels = {s.name: s.count for s in summarize_mcap(recording)}
    assert channels["visual/cam0"] == 3 and channels["decision"] == 6
    assert channels["clock"] >= 1  # mic0 and asr0 sent 6 s, enough to learn their clocks
    with open(recording, "rb") as handle:
        from mcap.reader import make_reader
        clocks = next(r.metadata for r in make_reader(handle).iter_metadata() if r.name == "mmfuse-clocks")
    assert set(clocks) == {"rec/cam0", "rec/mic0", "rec/asr0"}
    assert all(abs(json.loads(v)["drift_ppm"]) < 1e5 and json.loads(v)["resets"] == 0 for v in clocks.values())

    # a fresh daemon on other ports, fed by mmfuse-replay from the recording, twice: the second replay is a new
    # run of the session, decided as by a fresh daemon
    path = tmp_path / "replay.yaml"
    with daemon_listening(on_fresh_ports(config), path) as (_, listener):
        replays = []
        for _ in range(2):
            assert replay_main([str(recording), "--config", str(path), "--wait-s", "30"]) == 0
            replays.append(collect(listener, quiet_s=4, expect=len(live)))
    for replayed in replays:
        assert sorted(map(decision_key, replayed)) == sorted(map(decision_key, live))


def test_a_replay_the_daemon_rejects_whole_says_so_and_fails(recorded, tmp_path, capsys):
    recording, _, _ = recorded
    config, _ = read_recording(recording)
    path = tmp_path / "replay.yaml"
    with daemon_listening(on_fresh_ports(config), path):
        narrow = tmp_path / "narrow.mcap"  # every message of the wrong dimension for the daemon's bundle
        writer = RecordingWriter(narrow, config)
        for m in read_recording(recording)[1]:
            body = msgpack.unpackb(m.payload, raw=False)
            if body["kind"] == "data":
                body.update(data=body["data"][:8], shape=[2])
            payload = msgpack.packb(body, use_bin_type=True)
            writer.sensor_message(m.sensor, wire.decode([m.topic, payload]), payload, m.received)
        writer.close({})
        assert replay_main([str(narrow), "--config", str(path), "--wait-s", "30"]) == 1
    assert "the daemon published no decision for the 1 session(s)" in capsys.readouterr().err


def without_latency(decisions):
    return sorted(({k: v for k, v in d.items() if k != "latency_ms"} for d in decisions),
                  key=lambda d: (d["session"], d["window"]["id"], d["window"]["revision"]))


def test_virtual_clock_replays_repeat_exactly_and_match_the_live_session_and_eval_log(recorded, tmp_path):
    recording, live, _ = recorded
    config, _ = read_recording(recording)
    path = tmp_path / "replay.yaml"
    runs = []
    with daemon_listening(on_fresh_ports(config), path, "--virtual-clock") as (_, listener):
        for _ in range(2):  # one daemon, two replays: the final tick resets it for the next
            assert replay_main([str(recording), "--config", str(path), "--virtual-clock", "--speed", "max"]) == 0
            runs.append(collect(listener, quiet_s=3, expect=len(live)))
    assert len(runs[0]) == len(live) and without_latency(runs[0]) == without_latency(runs[1])
    assert sorted(map(decision_key, runs[0])) == sorted(map(decision_key, live))
    lines = tmp_path / "eval.jsonl"
    assert eval_main(["--log", str(recording), "--config", str(path), "--decisions-out", str(lines)]) == 0
    offline = [json.loads(line) for line in lines.read_text().splitlines()]
    assert without_latency(offline) == without_latency(runs[0])


def test_utterance_windows_on_a_recording_whose_segments_are_the_windows_decide_alike(recorded, tmp_path):
    recording, _, _ = recorded
    config, _ = read_recording(recording)
    out = {}
    for mode in ("time", "utterance"):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump({**config, "window": {**config["window"], "mode": mode}}))
        lines = tmp_path / f"{mode}.jsonl"
        assert eval_main(["--log", str(recording), "--config", str(path), "--decisions-out", str(lines)]) == 0
        out[mode] = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [(d["window"]["start"], d["window"]["end"]) for d in out["utterance"]] == \
        [(w * 0.5, (w + 1) * 0.5) for w in range(6)]  # each of asr0's segments is one window
    assert without_latency(out["utterance"]) == without_latency(out["time"])


@pytest.fixture(scope="module")
def eeg_bundle(tmp_path_factory):
    """A bundle whose audio modality is 8-d, as the BioSemi EEG stream of clock_resets.xdf."""
    directory = tmp_path_factory.mktemp("eeg")
    data = make_synthetic(directory / "eeg.npz", videos=12, per_video=8, seed=3, dims={"audio": 8})
    assert train_main(["--data", str(data), "--out", str(directory / "bundle"), "--encoder-epochs", "3",
                       "--head-epochs", "3", "--restorers", "zero,mean"]) == 0
    return directory / "bundle"


def test_clock_resets_xdf_through_a_daemon_gives_dropped_windows_not_a_crash(shared_data, eeg_bundle, tmp_path):
    config = {"bundle": str(eeg_bundle), "sensors": [{"name": "eeg0", "modality": "audio",
                                                      "endpoint": f"tcp://127.0.0.1:{free_port()}"}],
              "restorer": {"method": "mean"}, "output": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}
    path = tmp_path / "eeg.yaml"
    with daemon_listening(config, path, "--virtual-clock") as (daemon, listener):
        assert replay_main([str(shared_data / "recordings" / "clock_resets.xdf"), "--config", str(path),
                            "--map", "BioSemi=audio", "--virtual-clock", "--speed", "max"]) == 0
        decisions = collect(listener, quiet_s=5)
        assert daemon.process.poll() is None, daemon.log()
    starts = sorted(d["window"]["start"] for d in decisions)
    gap = max(zip(starts, starts[1:]), key=lambda pair: pair[1] - pair[0])
    assert 270 < gap[1] - gap[0] < 280 and 948 <= gap[0] + 2.0 <= 951  # the 274 s gap: no windows, no crash
    assert len(decisions) > 140 and all(d["present"] == ["audio"] for d in decisions)
    steps = np.diff(starts)
    assert set(steps[steps < 100]) == {2.0}  # a decision every window on either side of the gap


def test_a_foreign_mcap_file_is_explained_not_crashed_on(shared_data, capsys):
    talker = shared_data / "recordings" / "talker.mcap"
    with pytest.raises(RecordingError, match="no mmfuse channels.*/rosout \\(cdr, rcl_interfaces/msg/Log, 10"):
        read_recording(talker)
    assert replay_main([str(talker), "--speed", "max"]) == 2
    assert replay_main([str(talker), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "/topic [cdr, std_msgs/msg/String; not usable by mmfuse]: 10 messages" in listing


def test_xdf_listing_reports_gaps_clock_resets_and_empty_streams(shared_data, capsys):
    assert replay_main([str(shared_data / "recordings" / "clock_resets.xdf"), "--list"]) == 0
    listing = capsys.readouterr().out
    eeg = next(line for line in listing.splitlines() if "BioSemi" in line)
    assert "27815 messages" in eeg and "gaps 273.6 s" in eeg and "clock resets offset +653461.5 s" in eeg
    assert replay_main([str(shared_data / "recordings" / "empty_streams.xdf"), "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("0 messages, empty") == 2


def test_an_xdf_stream_becomes_features_on_the_mapped_sensor(shared_data):
    config = parse_config({"bundle": "b", "sensors": [{"name": "eeg0", "modality": "audio",
                                                       "endpoint": "tcp://127.0.0.1:5999"},
                                                      {"name": "marks", "modality": "text",
                                                       "endpoint": "tcp://127.0.0.1:5998"}]})
    schedule = sorted(xdf_schedule(str(shared_data / "recordings" / "clock_resets.xdf"), config,
                                   {"BioSemi": "audio", "MyMarkerStream": "text"}))
    bodies = [wire.decode(item.frames) for item in schedule]
    assert all(body.source == item.sensor for item, body in zip(schedule, bodies))
    eeg = [b for b in bodies if b.source == "eeg0" and b.kind == "data"]
    assert sum(b.shape[0] for b in eeg) == 27815 and all(b.shape[1] == 8 for b in eeg)
    streams, _ = pyxdf.load_xdf(str(shared_data / "recordings" / "clock_resets.xdf"))
    (biosemi,) = [s["time_series"] for s in streams if s["info"]["name"][0] == "BioSemi"]
    np.testing.assert_array_equal(np.concatenate([np.frombuffer(b.data, "<f4").reshape(b.shape) for b in eeg]),
                                  np.asarray(biosemi, np.float32))  # each stream's own samples, in time order
    assert [b.seq for b in bodies if b.source == "eeg0"] == list(range(len(eeg) + 1))
    assert sum(b.encoding == "utf8" for b in bodies) == 175
    times = np.array([b.t for b in eeg])
    assert (np.diff(times) > 200).sum() == 1  # the 274 s gap survives; the clock reset does not show as a jump
    with pytest.raises(RecordingError, match="no stream Nope"):
        xdf_schedule(str(shared_data / "recordings" / "clock_resets.xdf"), config, {"Nope": "audio"})
    # a numeric stream before a string one: each message carries its own stream's samples
    minimal = str(shared_data / "recordings" / "minimal.xdf")
    bodies = [wire.decode(item.frames) for item in xdf_schedule(minimal, config, {"SendDataC": "audio",
                                                                                  "SendDataString": "text"})]
    streams = {s["info"]["name"][0]: s["time_series"] for s in pyxdf.load_xdf(minimal)[0]}
    np.testing.assert_array_equal(np.concatenate([np.frombuffer(b.data, "<f4").reshape(b.shape) for b in bodies
                                                  if b.source == "eeg0" and b.kind == "data"]),
                                  np.asarray(streams["SendDataC"], np.float32))
    assert [b.data for b in bodies if b.source == "marks" and b.kind == "data"] == \
        [str(sample[0]) for sample in streams["SendDataString"]]
    with pytest.raises(RecordingError, match="needs --map NAME=MODALITY"):
        xdf_schedule(str(shared_data / "recordings" / "clock_resets.xdf"), config, {})


def test_eval_from_a_recording_is_deterministic_and_scores_the_real_drops(recorded, tmp_path):
    recording, live, _ = recorded
    labels = tmp_path / "labels.csv"
    labels.write_text("session,start,end,label\n" + "".join(
        f"rec,{w * WINDOW},{(w + 1) * WINDOW},{d['label']}\n"
        for w, d in enumerate(sorted(live, key=lambda d: d["window"]["id"]))))
    outputs = []
    for run in range(2):
        out = tmp_path / f"decisions{run}.jsonl"
        assert eval_main(["--log", str(recording), "--labels", str(labels), "--decisions-out", str(out),
                          "--json", str(tmp_path / f"eval{run}.json")]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    virtual = [json.loads(line) for line in outputs[0].splitlines()]
    assert [(d["window"]["id"], d["restored"], d["dropped"]) for d in virtual] == \
        [(d["window"]["id"], d["restored"], d["dropped"]) for d in sorted(live, key=lambda d: d["window"]["id"])]
    result = json.loads((tmp_path / "eval0.json").read_text())
    assert result["decisions"] == 6 and result["labelled"] == 6 and result["acc"] == 1.0
    assert result["by_pattern"]["avt"]["windows"] == 3 and result["by_pattern"]["at"]["windows"] == 3
    assert result["dropped_windows_by_source"] == {"cam0": 3}
    labels.write_text("session,start,end,label\nrec,0,2,happy\n")  # no label of the bundle's
    assert eval_main(["--log", str(recording), "--labels", str(labels)]) == 2


def test_eval_of_a_recording_it_cannot_score_says_why(recorded, tmp_path, capsys, bundle_dir):
    """Labels that match no decided window, a configuration that names none of the recording's sensors, and a
    recording whose every message its sensors cannot use: each says so, and the last two fail."""
    recording, live, _ = recorded
    config = tmp_path / "recorded.yaml"
    config.write_text(yaml.safe_dump(read_recording(recording)[0]))
    labels = tmp_path / "labels.csv"
    labels.write_text(f"session,start,end,label\nanother,0,2,{live[0]['label']}\n")
    capsys.readouterr()
    assert eval_main(["--log", str(recording), "--labels", str(labels), "--json", str(tmp_path / "r.json")]) == 0
    assert "no decided window lies in a labelled span" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["acc"] is None
    renamed = yaml.safe_load(config.read_text())
    renamed["sensors"] = [{**sensor, "name": sensor["name"] + "x"} for sensor in renamed["sensors"]]
    (tmp_path / "renamed.yaml").write_text(yaml.safe_dump(renamed))
    assert eval_main(["--log", str(recording), "--config", str(tmp_path / "renamed.yaml")]) == 2
    assert "are none of the configuration's (cam0x, mic0x, asr0x)" in capsys.readouterr().err
    assert replay_main([str(recording), "--config", str(tmp_path / "renamed.yaml")]) == 2
    texts = [wire.encode(wire.text_message("s1", "asr0", k, float(k), "hello", 1.0))[1] for k in range(5)]
    words = crafted_recording(tmp_path / "words.mcap", texts)  # text to a features bundle's sensor
    assert eval_main(["--log", str(words), "--config", str(config), "--json", str(tmp_path / "w.json")]) == 1
    assert "no window was decided: the sensors rejected or could not use every message (asr0: 5 utf8 it cannot " \
           "encode)" in capsys.readouterr().err
    for flags, words in ((["--eta", "nan"], "--eta"), (["--seeds", "0"], "--seeds"),
                         (["--json", str(tmp_path)], "is a directory")):
        with pytest.raises(SystemExit):
            eval_main(["--log", str(recording), *flags])
        assert words in capsys.readouterr().err


def test_a_labels_csv_is_read_as_a_spreadsheet_writes_it_and_each_bad_row_is_named(tmp_path):
    from mmfuse.datasets import DataError
    from mmfuse.training.log_eval import read_labels

    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffSession, Start ,END,Label\nrec,0,2,positive\n".encode())  # Excel's "CSV UTF-8"
    assert read_labels(labels) == {"rec": [(0.0, 2.0, "positive")]}
    for text, words in (("session,start,end,label\nrec,0,2\n", ":2: a row needs a session, start, end and label"),
                        ("session,start,end,label\nrec,2,1,a\n", ":2: start and end must be finite, start before end"),
                        ("session,start,end,label\nrec,0,nan,a\n", "start before end, got 0, nan"),
                        ("session,start,end,label\nrec,x,1,a\n", ":2: start and end must be numbers"),
                        ("who,when,what\n", "the header must name session,start,end,label; it names who,when,what")):
        labels.write_text(text)
        with pytest.raises(DataError, match=re.escape(words)):
            read_labels(labels)
    labels.write_bytes(b"session,start,end,label\nr\xe9c,0,1,a\n")
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_labels(labels)
    with pytest.raises(DataError, match="a directory, not a CSV file"):
        read_labels(tmp_path)


def test_a_listing_finds_the_real_gap_and_none_in_a_stream_that_comes_in_pairs():
    """Messages that come two at a time (a sensor that sends its data and heartbeat together) pull the median step
    towards 0: it is not the stream's usual interval."""
    from mmfuse.recording import gaps_and_resets

    paired = np.sort(np.concatenate([np.arange(0, 30, 0.25), np.arange(0, 30, 0.25) + 0.001]))
    assert gaps_and_resets(paired) == ([], [])
    assert gaps_and_resets(np.concatenate([np.arange(0, 10, 0.1), np.arange(15, 20, 0.1)]))[0] == \
        [(pytest.approx(9.9), pytest.approx(5.1))]


def crafted_recording(path, payloads, config="{}", compressed=True, schema=0):
    """An MCAP file laid out as mmfuse records, holding these payloads on one text channel."""
    from mcap.writer import CompressionType, Writer

    with open(path, "wb") as handle:
        writer = Writer(handle, compression=CompressionType.ZSTD if compressed else CompressionType.NONE)
        writer.start(profile="mmfuse", library="test")
        writer.add_metadata("mmfuse", {"config": config})
        channel = writer.register_channel("text/asr0", "msgpack", schema,
                                          {"modality": "text", "source": "asr0", "sensor": "asr0"})
        for k, payload in enumerate(payloads):
            writer.add_message(channel, (k + 1) * 10**9, payload, (k + 1) * 10**9, k)
        writer.finish()
    return path


def test_damaged_recordings_are_named_errors_and_a_foreign_message_is_skipped_not_crashed_on(tmp_path):
    good = [wire.encode(wire.text_message("s1", "asr0", k, float(k), "hello", 1.0))[1] for k in range(3)]
    mixed = crafted_recording(tmp_path / "mixed.mcap", [good[0], b"\xc1 not msgpack", msgpack.packb(42), good[1],
                                                         msgpack.packb({"session": "s1", "t": "soon"}), good[2]])
    _, messages = read_recording(mixed)
    assert [m.payload for m in messages] == good  # the three that are no sensor message are skipped
    with pytest.raises(RecordingError, match="none of its 2 messages is an mmfuse sensor message"):
        read_recording(crafted_recording(tmp_path / "foreign.mcap", [b"\xc1", msgpack.packb([1])]))
    with pytest.raises(RecordingError, match="mmfuse metadata holds no configuration"):
        read_recording(crafted_recording(tmp_path / "config.mcap", good, config="{not json"))
    data = (mixed).read_bytes()
    (tmp_path / "cut.mcap").write_bytes(data[:8])
    flipped = bytearray(data)
    for i in range(200, len(flipped) - 200, 97):
        flipped[i] ^= 0xFF
    (tmp_path / "flipped.mcap").write_bytes(bytes(flipped))
    (tmp_path / "empty.mcap").write_bytes(b"")
    for name in ("cut", "flipped", "empty"):
        with pytest.raises(RecordingError, match=f"{name}.mcap: (not a readable MCAP file|the MCAP file is damaged)"):
            read_recording(tmp_path / f"{name}.mcap")
        with pytest.raises(RecordingError):
            summarize_mcap(tmp_path / f"{name}.mcap")
    unknown_schema = crafted_recording(tmp_path / "schema.mcap", good, schema=99)
    with pytest.raises(RecordingError, match=r"text/asr0 \(names schema 99, which the file does not hold: damaged"):
        read_recording(unknown_schema)
    assert [s.kind for s in summarize_mcap(unknown_schema)] == ["names schema 99, which the file does not hold: damaged"]
    for path, words in ((tmp_path / "absent.mcap", "no such file"), (tmp_path, "a directory")):
        for read in (read_recording, summarize_mcap):
            with pytest.raises(RecordingError, match=words):
                read(path)


def test_a_byte_changed_in_a_chunk_is_an_error_and_a_damaged_summary_still_gives_every_message(tmp_path):
    """A chunk's CRC is checked as it is read: a message changed on disk is never scored. A damaged summary at the
    file's end (its statistics, say) loses no message: the file is read record by record, with a warning."""
    good = [wire.encode(wire.text_message("s1", "asr0", k, float(k), "hello", 1.0))[1] for k in range(3)]
    data = crafted_recording(tmp_path / "plain.mcap", good, compressed=False).read_bytes()
    (tmp_path / "changed.mcap").write_bytes(data.replace(b"hello", b"jello", 1))
    for read in (read_recording, summarize_mcap):
        with pytest.raises(RecordingError, match="changed.mcap: the MCAP file is damaged .CRCValidationError"):
            read(tmp_path / "changed.mcap")
    footer = len(data) - 8 - 29  # the footer record (opcode, length, two offsets, CRC), then the closing magic
    summary_start = struct.unpack_from("<Q", data, footer + 9)[0]
    (tmp_path / "summary.mcap").write_bytes(data[:summary_start] + b"\xff" * (footer - summary_start) + data[footer:])
    assert [m.payload for m in read_recording(tmp_path / "summary.mcap")[1]] == good
    assert [s.count for s in summarize_mcap(tmp_path / "summary.mcap") if s.name == "text/asr0"] == [3]


def test_a_recording_whose_writer_was_killed_is_read_up_to_where_it_ends(tmp_path):
    """A recorder killed outright writes no summary: what it flushed (every second) is read, with a warning."""
    path = tmp_path / "killed.mcap"
    writer = RecordingWriter(path, {"sensors": []})
    for k in range(5):
        writer.sensor_message("asr0", wire.text_message("s1", "asr0", k, float(k), "hello", 1.0),
                              wire.encode(wire.text_message("s1", "asr0", k, float(k), "hello", 1.0))[1], 100.0 + k)
        if k == 2:
            writer.flush()
    writer.handle.flush()  # (the chunk of messages 3 and 4 is still open: a kill loses it)
    cut = path.read_bytes()
    (tmp_path / "cut.mcap").write_bytes(cut)
    (tmp_path / "cut_short.mcap").write_bytes(cut[:-7])  # into the chunk's message index, after the chunk
    config, messages = read_recording(tmp_path / "cut.mcap")
    assert config == {"sensors": []} and [m.received for m in messages] == [100.0, 101.0, 102.0]
    assert [s.count for s in summarize_mcap(tmp_path / "cut.mcap") if s.name == "text/asr0"] == [3]
    assert len(read_recording(tmp_path / "cut_short.mcap")[1]) == 3
    writer.close({})
    assert len(read_recording(path)[1]) == 5


def test_record_refuses_a_duration_of_no_length_an_output_that_is_a_directory_and_one_that_exists(tmp_path):
    (tmp_path / "earlier.mcap").write_text("an earlier recording")
    for flags, words in ((["--duration-s", "0"], "positive number"), (["--duration-s", "nan"], "positive number"),
                         (["--duration-s", "-3"], "positive number"), (["--out", str(tmp_path)], "is a directory"),
                         (["--out", str(tmp_path / "earlier.mcap")], "exists (an earlier recording?)")):
        args = ["--config", "c.yaml", "--out", str(tmp_path / "x.mcap"), *flags]
        result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.record", *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and words in result.stderr, result.stderr
    assert (tmp_path / "earlier.mcap").read_text() == "an earlier recording"


def test_a_recorder_killed_outright_leaves_a_file_that_reads_back_what_it_had_recorded(tmp_path):
    """mmfuse-record puts what it recorded in the file every second: SIGKILL loses at most the last second."""
    context = zmq.Context.instance()
    publisher = context.socket(zmq.XPUB)
    port = free_port()
    publisher.bind(f"tcp://127.0.0.1:{port}")
    config = tmp_path / "lab.yaml"
    config.write_text(yaml.safe_dump({"bundle": "b", "sensors": [
        {"name": "asr0", "modality": "text", "endpoint": f"tcp://127.0.0.1:{port}"}]}))
    recording = tmp_path / "killed.mcap"
    recorder = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.record", "--config", str(config),
                                 "--out", str(recording)], stderr=subprocess.DEVNULL)
    try:
        assert publisher.poll(30_000), "the recorder did not subscribe"
        publisher.recv()
        for k in range(10):
            publisher.send_multipart(wire.encode(wire.text_message("s1", "asr0", k, float(k), "hello", 1.0)))
        deadline = time.monotonic() + 20
        while not flushed(recording, 10):  # the recorder flushes every second
            assert time.monotonic() < deadline, "the recorder never flushed the 10 messages"
            time.sleep(0.25)
        recorder.kill()
        recorder.wait(10)
    finally:
        if recorder.poll() is None:
            recorder.kill()
        publisher.close(linger=0)
    _, messages = read_recording(recording)
    assert [msgpack.unpackb(m.payload)["seq"] for m in messages] == list(range(10))


def flushed(recording, count) -> bool:
    """Whether the recording, still being written, holds `count` messages already."""
    try:
        return len(read_recording(recording)[1]) >= count
    except RecordingError:  # nothing flushed yet
        return False
