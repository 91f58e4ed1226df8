"""Memory soak of a live daemon: N sessions of three feature sensors in real time for a long run.

    python bench/soak.py --sessions 32 --duration-s 1800

Samples the memory of the daemon's whole process tree (driver, Ray's processes, every actor) every
`--sample-s` seconds, as RSS summed over the processes and as PSS (each shared page counted once: what the tree
holds of the machine), and reports the growth of each per hour after `--warmup-s` (a least-squares slope over
the samples after warm-up, as a share of their mean), with the decisions counted against the windows sent.
Writes JSON (default bench/results/soak.json) after every sample, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_latency import SENSORS, ensure_bundle, live_lab, start_daemon  # noqa: E402
from mmfuse import wire  # noqa: E402
from mmfuse.bundle import load_bundle  # noqa: E402
from mmfuse.daemon.main import tree_memory_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=300.0)
    parser.add_argument("--shared-model-process", action="store_true",
                        help="pipeline.shared_model_process: fusion in the restorer's process")
    parser.add_argument("--bundle", default=None, help="features bundle; default: train one on generated data")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "soak.json"))
    return parser.parse_args()


def growth_per_hour(samples: list[tuple[float, float]], warmup_s: float) -> float | None:
    """Least-squares slope of (time, MiB) samples after warm-up, in percent of their mean per hour."""
    kept = [(t, mib) for t, mib in samples if t >= warmup_s]
    if len(kept) < 3:
        return None
    t, mib = np.array(kept).T
    slope = np.polyfit(t, mib, 1)[0]  # MiB per second
    return round(float(slope * 3600 / mib.mean() * 100), 3)


def growth(samples: list[dict], warmup_s: float) -> dict[str, float | None]:
    return {key: growth_per_hour([(s["t"], s[key]) for s in samples], warmup_s) for key in ("rss_mb", "pss_mb")}


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the daemon too (finally), not only this
    workdir = Path(tempfile.mkdtemp(prefix="mmfuse-soak-"))
    bundle = ensure_bundle(args.bundle, workdir, media=False)
    dims = {m: spec["dim"] for m, spec in load_bundle(bundle).modalities.items()}
    context = zmq.Context()
    config_path, sockets, listener = live_lab(workdir, bundle, args.window_s, "autoencoder", context,
                                                 args.shared_model_process)
    daemon, log_lines = start_daemon(config_path)
    decided: set[tuple[str, int]] = set()
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            if listener.poll(200):
                while True:
                    try:
                        decision = wire.decode_decision(listener.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    decided.add((decision["session"], decision["window"]["id"]))

    result: dict = {"sessions": args.sessions, "duration_s": args.duration_s,
                    "shared_model_process": args.shared_model_process, "samples": []}
    try:
        for sock in sockets.values():
            if not sock.poll(180_000):
                print("daemon did not subscribe:\n" + "".join(log_lines[-40:]), file=sys.stderr)
                return 1
            sock.recv()
        threading.Thread(target=listen, daemon=True).start()
        rng = np.random.default_rng(0)
        sessions = [f"soak{i:02d}" for i in range(args.sessions)]
        seq = dict.fromkeys(((s, n) for s in sessions for n in SENSORS), 0)
        start = time.monotonic()
        next_sample = start
        windows = int(args.duration_s / args.window_s)
        for k in range(windows):
            for session in sessions:
                for name, modality in SENSORS.items():
                    message = wire.features_message(session, name, modality, seq[session, name], k * args.window_s,
                                                    rng.normal(size=dims[modality]), duration=args.window_s)
                    sockets[name].send_multipart(wire.encode(message))
                    seq[session, name] += 1
            if time.monotonic() >= next_sample:
                now = time.monotonic() - start
                result["samples"].append({"t": round(now, 1), **tree_memory_mb(daemon.pid)})
                result["growth_percent_per_hour"] = growth(result["samples"], args.warmup_s)
                result["windows_sent"], result["decisions"] = k * len(sessions), len(decided)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
                sample = result["samples"][-1]
                print(f"{now:7.0f} s  RSS {sample['rss_mb']:8.1f} MiB  PSS {sample['pss_mb']:8.1f} MiB  "
                      f"decisions {len(decided)}", flush=True)
                next_sample += args.sample_s
            time.sleep(max(0.0, start + (k + 1) * args.window_s - time.monotonic()))
        for session in sessions:
            for name, modality in SENSORS.items():
                sockets[name].send_multipart(wire.encode(wire.SensorMessage(
                    session, name, modality, seq[session, name], windows * args.window_s, kind="end")))
        time.sleep(3 * args.window_s + 1)
        result["windows_sent"], result["decisions"] = windows * len(sessions), len(decided)
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
        context.destroy(linger=0)
    result["growth_percent_per_hour"] = growth(result["samples"], args.warmup_s)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
