"""The daemon as users run it: `mmfuse-daemon` in its own process, fed by a plain pyzmq
client written here (not the project's replay), decisions read from its output socket."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import psutil
import pytest
import yaml
import zmq

from conftest import free_port

WINDOW = 0.5
TIMEOUT = 1.5  # generous: the suite must not fail on a loaded 2-core machine
DIMS = {"audio": 73, "visual": 100, "text": 100}
SENSORS = {"cam0": "visual", "mic0": "audio", "asr0": "text"}


class Daemon:
    def __init__(self, config_path, *flags):
        self.process = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(config_path),
                                         *flags], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)
            if "daemon ready" in line:
                self.ready.set()

    def log(self, lines: int = 80) -> str:
        return "".join(self.lines[-lines:])


def decode(frames):
    return msgpack.unpackb(frames[1], raw=False)


class Lab:
    """A running daemon on free ports, the client's sensor sockets, and a decision subscriber."""

    def __init__(self, directory, bundle_dir, restorer: dict, window: float = WINDOW, **sections):
        ports = {name: free_port() for name in SENSORS}
        output = f"tcp://127.0.0.1:{free_port()}"
        config = {"bundle": str(bundle_dir),
                  "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{ports[n]}"}
                              for n, m in SENSORS.items()],
                  "window": {"length_s": window, "hop_s": window}, "drop": {"timeout_s": TIMEOUT},
                  "restorer": restorer, "output": {"endpoint": output}, "log": {"stats_interval_s": 2}, **sections}
        path = directory / "lab.yaml"
        path.write_text(yaml.safe_dump(config))
        self.context = zmq.Context()
        self.sockets = {}
        for name, port in ports.items():
            self.sockets[name] = self.context.socket(zmq.XPUB)  # XPUB tells us when the daemon has subscribed
            self.sockets[name].bind(f"tcp://127.0.0.1:{port}")
        self.decisions = self.context.socket(zmq.SUB)
        self.decisions.setsockopt(zmq.SUBSCRIBE, b"decision/")
        self.connected = self.decisions.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.decisions.connect(output)
        self.daemon = Daemon(path)

    def wait_ready(self):
        assert self.daemon.ready.wait(120), f"daemon did not become ready:\n{self.daemon.log()}"
        for name, sock in self.sockets.items():
            assert sock.poll(10_000), f"daemon never subscribed to {name}"
            sock.recv()
        assert self.connected.poll(10_000), "the decision subscriber never completed a handshake with the daemon"
        self.decisions.disable_monitor()
        self.connected.close(linger=0)
        time.sleep(0.2)  # the daemon's publisher has the subscription

    def close(self):
        if self.daemon.process.poll() is None:  # let the daemon stop Ray; a killed daemon leaves Ray's agents behind
            self.daemon.process.send_signal(signal.SIGTERM)
            try:
                self.daemon.process.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.process.kill()
        self.context.destroy(linger=0)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, bundle_dir):
    lab = Lab(tmp_path_factory.mktemp("e2e"), bundle_dir, {"method": "mean"})
    try:
        lab.wait_ready()
        yield lab.daemon, lab.sockets, lab.decisions
    finally:
        lab.close()


def message(session, source, seq, t, kind="data", rng=None, duration=WINDOW):
    body = {"v": 1, "session": session, "source": source, "modality": SENSORS[source], "seq": seq, "t": t,
            "kind": kind}
    if kind == "data":
        vector = rng.normal(size=DIMS[SENSORS[source]]).astype("<f4")
        body.update(encoding="features", data=vector.tobytes(), shape=[len(vector)], dtype="<f4", duration=duration)
    return [f"{SENSORS[source]}/{session}".encode(), msgpack.packb(body, use_bin_type=True)]


def collect(decisions, quiet_s, expect=0, limit_s=60.0):
    """Decisions until none came for `quiet_s`, once `expect` have come (waiting at most `limit_s` for them)."""
    received, deadline = [], time.monotonic() + limit_s
    while decisions.poll(1000 * (quiet_s if len(received) >= expect else max(0.0, deadline - time.monotonic()))):
        received.append(decode(decisions.recv_multipart()))
    return received


def test_one_decision_per_window_and_a_dead_camera_is_restored(lab):
    daemon, sockets, decisions = lab
    rng = np.random.default_rng(0)
    windows, camera_dies_after = 10, 4
    seq = {(s, n): 0 for s in ("alpha", "beta") for n in SENSORS}
    start = time.monotonic()
    for k in range(windows):
        time.sleep(max(0.0, start + (k + 1) * WINDOW - time.monotonic()))
        for session in ("alpha", "beta"):
            for name in SENSORS:
                if session == "alpha" and name == "cam0" and k > camera_dies_after:
                    continue
                sockets[name].send_multipart(message(session, name, seq[session, name], k * WINDOW, rng=rng))
                seq[session, name] += 1
        if k == 6:  # garbage on a live socket: counted and logged, nothing else lost
            sockets["mic0"].send_multipart([b"audio/alpha", b"\xc1\xc1 not msgpack"])
            sockets["mic0"].send_multipart([b"audio/alpha", msgpack.packb({"v": 99, "session": "alpha"})])
            sockets["mic0"].send_multipart([b"audio/beta", msgpack.packb([1, 2, 3])])
    for session in ("alpha", "beta"):
        for name in SENSORS:
            if not (session == "alpha" and name == "cam0"):
                sockets[name].send_multipart(message(session, name, seq[session, name], windows * WINDOW, "end"))

    received = collect(decisions, quiet_s=3.0, expect=2 * windows)
    assert daemon.process.poll() is None, f"daemon died:\n{daemon.log()}"
    ready = next(line for line in daemon.lines if "daemon ready" in line)
    actors = {name: psutil.Process(int(pid)) for name, pid in re.findall(r"'([\w-]+)': (\d+)", ready)}
    assert len(actors) == len(SENSORS) + 4, ready  # at the daemon's own priority, not Ray's nice 15 for workers
    assert {name: p.nice() for name, p in actors.items()} == dict.fromkeys(actors, os.nice(0))
    by_session = {}
    for decision in received:
        by_session.setdefault(decision["session"], []).append(decision)
    assert sorted(by_session) == ["alpha", "beta"]
    for session, items in by_session.items():
        ids = [d["window"]["id"] for d in items]
        assert sorted(ids) == list(range(windows)), f"{session}: windows {ids}\n{daemon.log(200)}"

    for decision in by_session["beta"]:
        assert decision["present"] == ["audio", "text", "visual"]
        assert decision["restored"] == [] and decision["dropped"] == [] and decision["restorer"] == "none"
    for decision in by_session["alpha"]:
        k = decision["window"]["id"]
        assert decision["window"]["start"] == pytest.approx(k * WINDOW)
        assert decision["window"]["end"] == pytest.approx((k + 1) * WINDOW)
        if k <= camera_dies_after:
            assert decision["restored"] == [] and decision["dropped"] == []
        else:
            assert decision["present"] == ["audio", "text"]
            assert decision["restored"] == ["visual"] and decision["dropped"] == ["cam0"]
            assert decision["restorer"] == "mean"
    for decision in received:
        assert decision["v"] == 1 and decision["task"] == "sentiment"
        assert decision["label"] in decision["scores"]
        assert sum(decision["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert decision["latency_ms"] >= 0 and decision["bundle"]
    assert "malformed message rejected" in daemon.log()
    whole = daemon.log(lines=10**6)
    assert whole.count("sensors are not authenticated") == 1
    assert "\x1b[" not in whole and "pid=" not in whole.replace("pids=", "")  # one stream: no Ray prefixes, colours
    assert whole.count("sensor listening") == len(SENSORS)  # and no line folded away as a repeat


def test_sigterm_drains_open_windows_and_exits_cleanly(lab):
    daemon, sockets, decisions = lab
    rng = np.random.default_rng(1)
    for name in SENSORS:  # window 0 of a new session, still open: nobody has passed its end
        frames = message("gamma", name, 0, 0.0, rng=rng)
        body = msgpack.unpackb(frames[1])
        body["duration"] = 0.1
        sockets[name].send_multipart([frames[0], msgpack.packb(body, use_bin_type=True)])
    time.sleep(0.15)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=60) == 0, daemon.log()
    received = collect(decisions, quiet_s=1.0, expect=1, limit_s=5.0)
    assert [(d["session"], d["window"]["id"]) for d in received] == [("gamma", 0)]
    assert received[0]["present"] == ["audio", "text", "visual"]
    assert "stopped" in daemon.log()


def test_daemon_restores_with_diffusion_and_publishes_the_spread(tmp_path, bundle_dir):
    lab = Lab(tmp_path, bundle_dir, {"method": "diffusion", "steps": 4, "samples": 3, "abstain_spread": 1e-9})
    try:
        lab.wait_ready()
        rng = np.random.default_rng(2)
        for k in range(3):
            for name in ("cam0", "mic0") if k else SENSORS:  # text goes missing after window 0
                lab.sockets[name].send_multipart(message("delta", name, k, k * WINDOW, rng=rng))
            if k:
                lab.sockets["asr0"].send_multipart(message("delta", "asr0", k, (k + 1) * WINDOW, "heartbeat"))
            time.sleep(WINDOW)
        received = collect(lab.decisions, quiet_s=2.0, expect=3)
        lab.daemon.process.send_signal(signal.SIGTERM)
        assert lab.daemon.process.wait(timeout=60) == 0, lab.daemon.log()
    finally:
        lab.close()
    assert [d["window"]["id"] for d in received] == [0, 1, 2]
    assert received[0]["restorer"] == "none" and "restoration_spread" not in received[0]
    for decision in received[1:]:
        assert decision["restorer"] == "diffusion" and decision["restored"] == ["text"]
        assert decision["restoration_spread"] > 0 and decision["abstain"] is True
        assert decision["label"] == "abstain"
