"""Fault recovery of a live daemon: each actor kind SIGKILLed in turn under N live sessions.

Starts `mmfuse-daemon` on free ports, publishes N sessions of three feature sensors at
one window per second (a share of windows missing one modality, its sensor still
heartbeating), and kills, one after another with PHASE windows between, the process of
a sensor actor, the aligner, the restorer, fusion and the publisher (pids from the
daemon's `daemon ready` and `actor restarted` lines). For each kill it reports the
windows sent in its phase that were never decided (lost), decided more than once
(doubled), decided without data that reached the daemon (degraded: only expected for
the sensor's own windows while it restarts), the time from the kill to the first
decision after it (resume) and the longest silence of the output after it. With
`--shared-model-process` fusion runs in the restorer's process and has none of its own to kill.

    python bench/fault_recovery.py --sessions 16

Prints the figures and writes them as JSON (default bench/results/fault_recovery.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from e2e_latency import SENSORS, ensure_bundle, live_lab, report
from mmfuse import wire
from mmfuse.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]
KILLS = ["sensor-cam0", "aligner", "restorer", "fusion", "publisher"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--phase", type=int, default=12, help="windows between two kills")
    parser.add_argument("--incomplete", type=float, default=0.3, help="share of windows missing one modality")
    parser.add_argument("--restorer", default="mean")
    parser.add_argument("--shared-model-process", action="store_true",
                        help="pipeline.shared_model_process: fusion in the restorer's process")
    parser.add_argument("--bundle", default=None, help="bundle directory; default: train one on generated data")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "fault_recovery.json"))
    return parser.parse_args()


class Daemon:
    def __init__(self, config_path: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(config_path),
                                         "--log-json"], stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True).start()

    def pid(self, actor: str) -> int | None:
        """The actor's current pid: from its latest restart, else from `daemon ready`."""
        for line in reversed(self.lines):
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("event") == "actor restarted" and entry.get("actor") == actor:
                return entry["pid"]
            if entry.get("event") == "daemon ready":
                return entry["pids"].get(actor)
        return None


def main() -> int:
    args = parse_args()
    kills_in_turn = [a for a in KILLS if not (args.shared_model_process and a == "fusion")]  # none of its own
    workdir = Path(tempfile.mkdtemp(prefix="mmfuse-faults-"))
    bundle_path = ensure_bundle(args.bundle, workdir, media=False)
    dims = {m: spec["dim"] for m, spec in load_bundle(bundle_path).modalities.items()}
    context = zmq.Context()
    config_path, sockets, listener = live_lab(workdir, bundle_path, 1.0, args.restorer, context,
                                                 args.shared_model_process)
    daemon = Daemon(config_path)
    received: list[tuple[float, dict]] = []
    try:
        for sock in sockets.values():
            if not sock.poll(180_000):
                print("daemon did not subscribe:\n" + "".join(daemon.lines[-40:]), file=sys.stderr)
                return 1
            sock.recv()
        time.sleep(0.5)

        def listen(until: float) -> None:
            while (timeout := until - time.monotonic()) > 0 and listener.poll(timeout * 1000):
                received.append((time.monotonic(), wire.decode_decision(listener.recv_multipart())))

        rng = np.random.default_rng(0)
        sessions = [f"s{i:02d}" for i in range(args.sessions)]
        windows = args.phase * (len(kills_in_turn) + 1)
        sent: dict[tuple[str, int], list[str]] = {}
        kills: dict[str, float] = {}
        start = time.monotonic()
        seq = dict.fromkeys(((s, n) for s in sessions for n in SENSORS), 0)
        for k in range(windows):
            listen(start + (k + 0.5) * 1.0)
            for session in sessions:  # sensors heartbeat at least every drop.timeout_s / 2 (docs/protocol.md)
                for name, modality in SENSORS.items():
                    beat = wire.SensorMessage(session, name, modality, seq[session, name], float(k), kind="heartbeat")
                    sockets[name].send_multipart(wire.encode(beat))
                    seq[session, name] += 1
            listen(start + (k + 1) * 1.0)
            for session in sessions:
                leave_out = rng.choice(list(SENSORS)) if rng.random() < args.incomplete else None
                for name, modality in SENSORS.items():
                    if name == leave_out:
                        message = wire.SensorMessage(session, name, modality, seq[session, name], k + 1.0,
                                                     kind="heartbeat")
                    else:
                        message = wire.features_message(session, name, modality, seq[session, name], float(k),
                                                        rng.normal(size=dims[modality]), duration=1.0)
                    sockets[name].send_multipart(wire.encode(message))
                    seq[session, name] += 1
                sent[(session, k)] = sorted(SENSORS[n] for n in SENSORS if n != leave_out)
            phase, into = divmod(k + 1, args.phase)
            if into == 0 and 1 <= phase <= len(kills_in_turn):
                actor = kills_in_turn[phase - 1]
                pid = daemon.pid(actor)
                os.kill(pid, signal.SIGKILL)
                kills[actor] = time.monotonic()
                print(f"window {k}: killed {actor} (pid {pid})", file=sys.stderr)
        for session in sessions:
            for name, modality in SENSORS.items():
                end = wire.SensorMessage(session, name, modality, seq[session, name], float(windows), kind="end")
                sockets[name].send_multipart(wire.encode(end))
        listen(time.monotonic() + 5.0)
        daemon.process.send_signal(signal.SIGTERM)
        exit_code = daemon.process.wait(timeout=120)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    (workdir / "daemon.log").write_text("".join(daemon.lines))

    counts: dict[tuple[str, int, int], int] = {}
    for _, d in received:
        key = (d["session"], d["window"]["id"], d["window"]["revision"])
        counts[key] = counts.get(key, 0) + 1
    decided = {(d["session"], d["window"]["id"]): d for _, d in received}
    results = {}
    for phase, actor in enumerate(kills_in_turn, 1):
        ks = range(phase * args.phase - 1, (phase + 1) * args.phase - 1)  # from the window sent at the kill on
        keys = [(s, k) for s in sessions for k in ks]
        phase_keys = set(keys)
        after = [at - kills[actor] for at, _ in received if at > kills[actor]]
        arrivals = [kills[actor]] + [at for at, _ in received if kills[actor] < at < kills[actor] + args.phase]
        restarted = [json.loads(line) for line in daemon.lines if line.startswith("{") and
                     re.search(rf'"actor": "{actor}"', line) and '"actor restarted"' in line]
        results[actor] = {
            "windows": len(keys),
            "lost": sum(key not in decided for key in keys),
            "doubled": sum(n - 1 for (s, k, _), n in counts.items() if (s, k) in phase_keys and n > 1),
            "degraded": sum(key in decided and decided[key]["present"] != sent[key] for key in keys),
            "resume_s": round(after[0], 3) if after else None,
            "longest_silence_s": round(float(np.max(np.diff(arrivals))), 3) if len(arrivals) > 1 else None,
            "restart_s": restarted[0].get("took_s") if restarted else None,
        }
    result = {"sessions": args.sessions, "window_s": 1.0, "phase_windows": args.phase, "restorer": args.restorer,
              "shared_model_process": args.shared_model_process, "windows_sent": len(sent), "windows_decided": len(decided),
              "lost_total": sum(key not in decided for key in sent),
              "doubled_total": sum(n - 1 for n in counts.values() if n > 1), "kills": results,
              "daemon_exit_code": exit_code, "daemon_log": str(workdir / "daemon.log"), "cpu": os.cpu_count()}
    report(result, args.json)
    context.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
