"""CURVE: keys made by mmfuse-keys, refused peers counted, frames accepted only from a sensor's own key,
decisions only for authorized consumers; a world-readable secret key stops the daemon at start-up."""

import io
import json
import subprocess
import sys
import signal
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import structlog
import yaml
import zmq

from mmfuse import wire
from mmfuse.config import ConfigError, parse_config
from mmfuse.daemon.keys import list_certificates, main as keys_main, new_certificate
from mmfuse.daemon.main import main as daemon_main
from mmfuse.recording import read_recording
from mmfuse.security import (SENSORS as SENSOR_DOMAIN, Gatekeeper, SecurityError, authorized_keys, connect_as,
                             read_certificate, serve)

from conftest import free_port
from test_end_to_end import SENSORS, WINDOW, Daemon, message

DAEMON_BINDS = "mic0"  # peers connect to the daemon's socket for this one; the others bind their own


def certificate(directory, name):
    new_certificate(name, directory)
    return read_certificate(directory / f"{name}.key_secret", secret=True)


def test_keys_are_written_with_a_private_secret_and_listed(tmp_path, capsys):
    assert keys_main(["new", "cam0", "--dir", str(tmp_path / "sensors")]) == 0
    public, secret = tmp_path / "sensors" / "cam0.key", tmp_path / "sensors" / "cam0.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and public.stat().st_mode & 0o777 == 0o644
    key = read_certificate(public).public.decode()
    assert keys_main(["list", str(tmp_path / "sensors")]) == 0
    assert f"cam0  {key}  (secret here)" in capsys.readouterr().out
    assert keys_main(["new", "cam0", "--dir", str(tmp_path / "sensors")]) == 2  # never overwrites a key
    assert "already exist" in capsys.readouterr().err


def secured_config(tmp_path, bundle_dir, ports=None, consumers=True) -> dict:
    keys = tmp_path / "keys"
    new_certificate("daemon", keys)
    for name in SENSORS:
        new_certificate(name, keys / "sensors")
    if consumers:
        new_certificate("viewer", keys / "consumers")
    ports = ports or {name: free_port() for name in [*SENSORS, "output"]}
    return {"bundle": str(bundle_dir),
            "security": {"curve": {"secret_key": str(keys / "daemon.key_secret"),
                                   "authorized_keys": str(keys / "sensors")}},
            "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{ports[n]}", "bind": n == DAEMON_BINDS,
                         "public_key": str(keys / "sensors" / f"{n}.key")} for n, m in SENSORS.items()],
            "window": {"length_s": WINDOW, "hop_s": WINDOW}, "drop": {"timeout_s": 1.5},
            "output": {"endpoint": f"tcp://127.0.0.1:{ports['output']}",
                       **({"authorized_keys": str(keys / "consumers")} if consumers else {})},
            "log": {"stats_interval_s": 2}}


@pytest.fixture
def logging_restored():
    """mmfuse-daemon's main() configures logging onto this test's captured stderr: put it back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_a_world_readable_secret_key_is_refused_at_start_up(tmp_path, bundle_dir, capsys, logging_restored):
    config = secured_config(tmp_path, bundle_dir)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "keys" / "daemon.key_secret").chmod(0o644)
    for flags in (["--check"], []):
        assert daemon_main(["--config", str(path), *flags]) == 2
        assert "chmod 600" in capsys.readouterr().err
    (tmp_path / "keys" / "daemon.key_secret").chmod(0o600)
    assert daemon_main(["--config", str(path), "--check"]) == 0


def test_key_settings_without_security_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"sensors\[0\].public_key only apply with CURVE.*add security.curve"):
        parse_config({"bundle": "b", "sensors": [{"name": "cam0", "modality": "visual",
                                                   "endpoint": "tcp://127.0.0.1:1", "public_key": "cam0.key"}]})


def test_a_sensor_key_missing_from_the_authorized_keys_is_named(tmp_path, bundle_dir):
    from mmfuse.security import daemon_keys

    config = secured_config(tmp_path, bundle_dir)
    new_certificate("stranger", tmp_path / "elsewhere")
    config["sensors"][2]["public_key"] = str(tmp_path / "elsewhere" / "stranger.key")
    with pytest.raises(SecurityError, match=r"sensors\[2\].public_key: .* is not among the authorized keys"):
        daemon_keys(parse_config(config))


def test_peers_without_a_key_with_an_unknown_key_or_the_wrong_server_key_are_refused_and_counted(tmp_path):
    server, good, stranger = (certificate(tmp_path / name, name) for name in ("server", "good", "stranger"))
    context = zmq.Context()
    gate = Gatekeeper(context, structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
    gate.start()
    gate.admit(SENSOR_DOMAIN, frozenset({good.public}))
    receiver = context.socket(zmq.SUB)
    receiver.subscribe(b"")
    serve(receiver, server, SENSOR_DOMAIN)
    gate.watch(receiver, SENSOR_DOMAIN)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    receiver.bind(endpoint)
    try:
        for key, server_key in ((None, None), (stranger, server.public), (good, stranger.public)):
            sender = context.socket(zmq.PUB)
            if key is not None:
                connect_as(sender, key, server_key)
            sender.connect(endpoint)
            deadline = time.monotonic() + 5
            while gate.refused_count < 1 and time.monotonic() < deadline:
                receiver.poll(50)  # a bound SUB attaches its peers when polled
            assert gate.refused_count >= 1, f"peer with key {key} and server key {server_key} was not refused"
            sender.send_multipart([b"visual/s", b"forged"])
            assert not receiver.poll(200)
            sender.close(linger=0)
            gate.refused.counts.clear()
        sender = context.socket(zmq.PUB)
        connect_as(sender, good, server.public)
        sender.connect(endpoint)
        received = None
        for _ in range(100):
            sender.send_multipart([b"visual/s", b"genuine"])
            if receiver.poll(50):
                received = receiver.recv_multipart(copy=False)
                break
        assert received is not None and received[0].get("User-Id") == good.public.decode()
        sender.close(linger=0)
    finally:
        receiver.close(linger=0)
        gate.stop()
        context.destroy(linger=0)


def test_each_refused_key_is_logged_even_after_a_keyless_peers_retries_used_up_the_lines(tmp_path):
    stranger = certificate(tmp_path / "stranger", "stranger")
    lines = io.StringIO()
    gate = Gatekeeper(zmq.Context.instance(), structlog.wrap_logger(structlog.PrintLogger(lines)))
    gate.admit(SENSOR_DOMAIN, frozenset())
    for _ in range(30):  # a peer without a key retrying: refused before ZAP is asked, no key to name
        gate._refuse("the peer did not speak CURVE", domain=SENSOR_DOMAIN, endpoint="tcp://127.0.0.1:1")
    assert not gate.callback(SENSOR_DOMAIN, stranger.public)
    assert gate.refused_count == 31 and stranger.public.decode() in lines.getvalue()


def stopped_stats(daemon: Daemon) -> dict:
    for line in reversed(daemon.lines):
        if '"event": "stopped"' in line:
            return json.loads(line)
    raise AssertionError(f"no 'stopped' line:\n{daemon.log()}")


def test_only_authorized_sensors_reach_a_decision_and_only_authorized_consumers_read_them(tmp_path, bundle_dir):
    ports = {name: free_port() for name in [*SENSORS, "output"]}
    config = secured_config(tmp_path, bundle_dir, ports)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    keys = tmp_path / "keys"
    server = read_certificate(keys / "daemon.key").public
    own = {name: read_certificate(keys / "sensors" / f"{name}.key_secret", secret=True) for name in SENSORS}
    stranger = certificate(tmp_path / "strangers", "stranger")
    context = zmq.Context()
    sockets = {}
    for name in SENSORS:
        sockets[name] = context.socket(zmq.XPUB)
        connect_as(sockets[name], own[name], server)
        if name == DAEMON_BINDS:
            sockets[name].connect(f"tcp://127.0.0.1:{ports[name]}")
        else:
            sockets[name].bind(f"tcp://127.0.0.1:{ports[name]}")
    consumers = {}
    for who, key in (("viewer", read_certificate(keys / "consumers" / "viewer.key_secret", secret=True)),
                     ("stranger", stranger), ("no key", None)):
        consumers[who] = context.socket(zmq.SUB)
        consumers[who].subscribe(b"decision/")
        if key is not None:
            connect_as(consumers[who], key, server)
        consumers[who].connect(f"tcp://127.0.0.1:{ports['output']}")
    intruders = []
    for key in (None, stranger, own["cam0"]):  # no key; an unknown key; cam0's valid key sending as mic0
        intruder = context.socket(zmq.PUB)
        if key is not None:
            connect_as(intruder, key, server)
        intruder.connect(f"tcp://127.0.0.1:{ports[DAEMON_BINDS]}")
        intruders.append(intruder)

    daemon = Daemon(path, "--log-json")
    rng = np.random.default_rng(0)
    try:
        assert daemon.ready.wait(120), f"daemon did not become ready:\n{daemon.log()}"
        for name, sock in sockets.items():
            assert sock.poll(10_000), f"daemon never subscribed to {name}"
            sock.recv()
        tap = [str(Path(sys.executable).parent / "mmfuse-tap"), "--config", str(path), "--json", "--duration-s", "5"]
        stranger_tap = subprocess.run([*tap, "--key", str(tmp_path / "strangers" / "stranger.key_secret")],
                                      capture_output=True, text=True, timeout=60)
        assert stranger_tap.returncode == 0 and stranger_tap.stdout == "", stranger_tap.stderr
        assert "refused this consumer's key" in stranger_tap.stderr and "connected to" not in stranger_tap.stderr
        seq = dict.fromkeys(SENSORS, 0)
        windows = 6
        start = time.monotonic()
        for k in range(windows):
            time.sleep(max(0.0, start + (k + 1) * WINDOW - time.monotonic()))
            for intruder in intruders:
                intruder.send_multipart(message("forged", DAEMON_BINDS, k, k * WINDOW, rng=rng))
            forged = msgpack.unpackb(message("forged", "cam0", k, k * WINDOW, rng=rng)[1])
            forged["source"] = "asr0"  # on cam0's own connection, as another configured sensor
            sockets["cam0"].send_multipart([b"visual/forged", msgpack.packb(forged)])
            for name in SENSORS:
                sockets[name].send_multipart(message("good", name, seq[name], k * WINDOW, rng=rng))
                seq[name] += 1
        for name in SENSORS:
            sockets[name].send_multipart(message("good", name, seq[name], windows * WINDOW, "end"))
        received = {who: [] for who in consumers}
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for who, consumer in consumers.items():
                while consumer.poll(0):
                    received[who].append(msgpack.unpackb(consumer.recv_multipart()[1]))
            time.sleep(0.05)
        assert daemon.process.poll() is None, f"daemon died:\n{daemon.log()}"
        assert received["stranger"] == [] and received["no key"] == []
        assert {d["session"] for d in received["viewer"]} == {"good"}, daemon.log()
        assert len(received["viewer"]) >= windows - 1
        assert all(not d["dropped"] for d in received["viewer"]), received["viewer"]
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(60)
        context.destroy(linger=0)
    stats = stopped_stats(daemon)
    sensors = {s["sensor"]: s for s in stats["sensors"]} if "sensors" in stats else \
        {v["sensor"]: v for v in stats.values() if isinstance(v, dict) and "sensor" in v}
    assert sensors[DAEMON_BINDS]["auth_refused"] >= 2 and sensors[DAEMON_BINDS]["rejected"]["wrong_source"] >= 1
    assert sensors["cam0"]["rejected"] == {"wrong_source": windows}
    publisher = next(v for v in stats.values() if isinstance(v, dict) and "published" in v)
    assert publisher["auth_refused"] >= 2
    refused = [json.loads(line[line.index("{"):]) for line in daemon.lines  # after Ray's "(Actor pid=...)"
               if "peer refused at the handshake" in line]
    assert any(r.get("key") == stranger.public.decode() and r.get("address") == "127.0.0.1" for r in refused)
    assert "sensors are not authenticated" not in daemon.log(lines=10**6)


def test_a_secured_lab_replays_and_records_with_its_keys(tmp_path, bundle_dir, feature_file, capsys):
    from mmfuse.daemon.replay import main as replay_main
    from mmfuse.recording import read_recording

    config = secured_config(tmp_path, bundle_dir, consumers=False)
    for sensor in config["sensors"]:
        sensor["bind"] = False  # the recorder connects to the replay's sockets as the daemon does
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    sensors = tmp_path / "keys" / "sensors"
    new_certificate("recorder", tmp_path / "keys" / "consumers")
    replay = ["--config", str(path), "--data", str(feature_file), "--sessions", "1", "--speed", "20", "--listen"]
    assert replay_main(replay) == 2
    assert "give your certificate with --key" in capsys.readouterr().err
    assert replay_main(replay + ["--key", str(sensors / "cam0.key_secret")]) == 2  # cam0's key cannot be mic0's
    assert "sensors[1] (mic0) takes messages from the key" in capsys.readouterr().err

    daemon = Daemon(path)
    recording = tmp_path / "secured.mcap"
    recorder = None
    try:
        assert daemon.ready.wait(120), daemon.log()
        recorder = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.record", "--config", str(path), "--out",
                                     str(recording), "--decisions", "--key",
                                     str(tmp_path / "keys" / "consumers" / "recorder.key_secret")],
                                    stderr=subprocess.PIPE, text=True)
        started = recorder.stderr.readline()
        assert started.startswith("recording"), started + recorder.stderr.read()
        keys = [arg for name in SENSORS for arg in ("--key", str(sensors / f"{name}.key_secret"))]
        assert replay_main(replay + keys) == 0
        out = capsys.readouterr()
        decided = int(out.err.strip().splitlines()[-1].split()[0])
        assert decided > 0, out.err
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(30)
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(60)
    assert recorder.returncode == 130, recorder.stderr.read()  # stopped by Ctrl-C, the file finished
    _, messages = read_recording(recording)
    assert {m.sensor for m in messages} == set(SENSORS)


def test_an_impostor_on_a_sensors_port_cannot_cut_the_genuine_sensor_off(tmp_path):
    """libzmq gives a connected endpoint up after a failed handshake; the gatekeeper has it connected again."""
    server, genuine = certificate(tmp_path / "server", "server"), certificate(tmp_path / "cam0", "cam0")
    context = zmq.Context()
    gate = Gatekeeper(context, structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
    gate.start()
    gate.admit(SENSOR_DOMAIN, frozenset({genuine.public}))
    daemon = context.socket(zmq.SUB)  # the daemon's socket for a sensor that binds its own
    daemon.subscribe(b"")
    serve(daemon, server, SENSOR_DOMAIN)
    gate.watch(daemon, SENSOR_DOMAIN)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon.connect(endpoint)

    def received_from(key, seconds) -> int:
        sensor = context.socket(zmq.PUB)
        if key is not None:
            connect_as(sensor, key, server.public)
        sensor.bind(endpoint)
        count, until = 0, time.monotonic() + seconds
        while time.monotonic() < until:
            gate.rejoin(daemon, endpoint)  # as the sensor actor's loop does
            sensor.send_multipart([b"visual/s", b"x"])
            while daemon.poll(10):
                daemon.recv_multipart()
                count += 1
        sensor.close(linger=0)
        time.sleep(0.2)
        return count

    try:
        assert received_from(genuine, 1.0) > 0
        assert received_from(None, 1.0) == 0 and gate.refused_count >= 1  # an impostor without a key took the port
        assert received_from(genuine, 2.0) > 0  # and the genuine sensor, back on it, is heard again
    finally:
        daemon.close(linger=0)
        gate.stop()
        context.destroy(linger=0)


def test_odd_key_names_and_links_are_refused_and_a_public_certificate_is_no_secret_key(tmp_path, capsys):
    for name in ("../x", "", " ", "with space", "x.key", "a" * 65):
        assert keys_main(["new", name, "--dir", str(tmp_path)]) == 2, name
    (tmp_path / "a_file").write_text("")
    assert keys_main(["new", "cam0", "--dir", str(tmp_path / "a_file")]) == 2
    assert "cannot write keys in" in capsys.readouterr().err
    (tmp_path / "cam0.key_secret").symlink_to(tmp_path / "elsewhere")  # dangling: never written through
    assert keys_main(["new", "cam0", "--dir", str(tmp_path)]) == 2 and not (tmp_path / "elsewhere").exists()
    new_certificate("daemon", tmp_path / "keys")
    with pytest.raises(SecurityError, match="holds no secret key"):
        read_certificate(tmp_path / "keys" / "daemon.key", secret=True)
    with pytest.raises(SecurityError, match="no such key file"):
        read_certificate(tmp_path / "keys", secret=True)


def test_a_certificate_whose_key_is_no_curve_key_is_refused_where_it_is_read(tmp_path):
    """A hand-edited `public-key = "short"` was listed, passed --check, and left its sensor unable to connect
    with nothing saying why."""
    directory = tmp_path / "keys"
    new_certificate("cam0", directory)
    (directory / "short.key").write_text('metadata\ncurve\n    public-key = "short"\n')
    for read in (lambda: read_certificate(directory / "short.key"), lambda: authorized_keys(directory)):
        with pytest.raises(SecurityError, match="short.*no CURVE key"):
            read()
    rows, unreadable = list_certificates(directory)  # the listing shows the good ones and names the bad one
    assert [name for name, _, _ in rows] == ["cam0"] and len(unreadable) == 1 and "short.key" in unreadable[0]
    assert keys_main(["list", str(directory)]) == 2


def test_a_clock_tick_of_no_plausible_time_is_refused():
    from mmfuse.virtual_clock import parse_tick

    assert parse_tick([b"", msgpack.packb({"t": 12.5, "final": False})]).now == 12.5
    for t in (1e300, float("nan"), float("inf"), "12", True):
        assert parse_tick([b"", msgpack.packb({"t": t, "final": False})]) is None, t


def test_the_recorder_takes_accepted_messages_from_the_daemons_key_only(tmp_path, bundle_dir):
    config = secured_config(tmp_path, bundle_dir) | {"recorder": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}
    path, recording = tmp_path / "lab.yaml", tmp_path / "accepted.mcap"
    path.write_text(yaml.safe_dump(config))
    recorder = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.record", "--config", str(path),
                                 "--out", str(recording)], stderr=subprocess.PIPE, text=True)
    assert recorder.stderr.readline().startswith("recording what the daemon accepts")
    daemon = read_certificate(tmp_path / "keys" / "daemon.key_secret", secret=True)
    sensor = read_certificate(tmp_path / "keys" / "sensors" / "cam0.key_secret", secret=True)
    context = zmq.Context()
    try:
        for key, t in ((sensor, 0.0), (daemon, 1.0)):  # a sensor's key is no daemon's: refused
            pusher = context.socket(zmq.PUSH)
            connect_as(pusher, key, daemon.public)
            pusher.connect(config["recorder"]["endpoint"])
            topic, payload = message("s1", "cam0", int(t), t, rng=np.random.default_rng(0))
            pusher.send_multipart(wire.encode_accepted("cam0", topic, payload, 100.0 + t))
            time.sleep(1.0)
            pusher.close(linger=0)
    finally:
        recorder.send_signal(signal.SIGTERM)
        assert recorder.wait(30) == 0
        context.destroy(linger=0)
    _, messages = read_recording(recording)
    assert [(m.sensor, m.received) for m in messages] == [("cam0", 101.0)]
    assert "auth_refused" in recorder.stderr.read()
