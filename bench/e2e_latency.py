"""End-to-end latency of a live daemon: N sessions of three feature sensors in real time.

Starts `mmfuse-daemon` on free ports, publishes every session's streams at real-time
pace with a share of incomplete windows (one modality left out, its sensor still
heartbeating), and measures, per window, the time from the moment the last message
of the window was sent (the window can close) to the decision's arrival: over all windows, and after the first
--warm-up-s of the run (every session starts at once, so its first windows meet every stage's first batches and
every stream's clock still being learnt, all at the same moment).

    python bench/e2e_latency.py --sessions 8 --duration-s 30
    python bench/e2e_latency.py --media --sessions 8 --duration-s 30

With --media the sensors send raw media instead of features: per window and session
15 JPEG camera frames (224x168), ten 100 ms chunks of 16 kHz PCM audio and one ASR
text segment, each sent when a real sensor would send it (a frame when captured, a
chunk when recorded, the segment at the window's end; --burst: all at the window's
end), and the daemon runs the bundle's towers (by default a bundle with the small
open_clip config trained briefly on a generated media set).

Prints the figures and writes them as JSON (default bench/results/e2e_latency.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

from mmfuse import wire
from mmfuse.bundle import load_bundle
from mmfuse.daemon.main import tree_memory_mb

ROOT = Path(__file__).resolve().parents[1]
SENSORS = {"cam0": "visual", "mic0": "audio", "asr0": "text"}


def peak_memory(peak: dict[str, float], sample: dict[str, float]) -> dict[str, float]:
    """The larger of each figure (rss_mb, pss_mb) of the peak so far and a new sample of tree_memory_mb."""
    return {key: max(peak.get(key, 0.0), value) for key, value in sample.items()}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=30.0, help="length of every session")
    parser.add_argument("--window-s", type=float, default=1.0, help="window length and hop")
    parser.add_argument("--incomplete", type=float, default=0.3, help="share of windows missing one modality")
    parser.add_argument("--restorer", default="mean")
    parser.add_argument("--bundle", default=None, help="bundle directory; default: train one on generated data")
    parser.add_argument("--media", action="store_true", help="send jpeg, pcm16 and utf8 instead of features")
    parser.add_argument("--burst", action="store_true", help="send a window's media in one burst at its end, "
                        "not as captured: the worst case, every encode after the window's last message")
    parser.add_argument("--shared-model-process", action="store_true",
                        help="pipeline.shared_model_process: fusion in the restorer's process")
    parser.add_argument("--warm-up-s", type=float, default=3.0,
                        help="windows ending in the run's first seconds are left out of `after_warm_up`")
    parser.add_argument("--json", default=None, help="default: bench/results/e2e_latency[_media].json")
    return parser.parse_args()


MEDIA: dict[str, list] = {}


def media_samples(rng) -> dict[str, list]:
    """A few camera frames (JPEG of noise: the slowest to decode) and 100 ms audio chunks, made once."""
    if not MEDIA:
        import io

        from PIL import Image

        MEDIA["jpeg"], MEDIA["pcm"] = [], [rng.normal(0, 0.1, 1600) for _ in range(8)]
        for _ in range(8):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (224, 168, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            MEDIA["jpeg"].append(buffer.getvalue())
    return MEDIA


def media_events(session: str, name: str, start: float, length: float, rng) -> list[tuple[float, object]]:
    """One window of a 15 fps camera, 100 ms audio chunks or one ASR segment, as (event time a message is
    complete and can be sent, seq -> message): a frame when it is captured, a chunk when its 100 ms are
    recorded, the segment at the window's end."""
    samples = media_samples(rng)
    if SENSORS[name] == "visual":
        return [(start + i / 15, lambda seq, t=start + i / 15: wire.jpeg_message(
                    session, name, seq, t, samples["jpeg"][seq % 8], duration=1 / 15)) for i in range(int(15 * length))]
    if SENSORS[name] == "audio":
        return [(start + 0.1 * (i + 1), lambda seq, t=start + 0.1 * i, chunk=samples["pcm"][i % 8]:
                 wire.pcm16_message(session, name, seq, t, chunk, 16000)) for i in range(int(length / 0.1))]
    segment = "so this is what I was talking about, really great"
    return [(start + length, lambda seq: wire.text_message(session, name, seq, start, segment, length))]


def window_events(k: int, sessions: list[str], args, dims: dict, rng) -> tuple[list, int]:
    """Every message of window k as (event time, session, sensor, seq -> message), in the order they are sent,
    and how many sessions leave one modality out (its sensor only heartbeats). Every sensor heartbeats at
    mid-window (at least every drop.timeout_s / 2, docs/protocol.md); features and, with --burst, media go out
    at the window's end."""
    start, end = k * args.window_s, (k + 1) * args.window_s
    events = []
    incomplete = 0
    for session in sessions:
        leave_out = rng.choice(list(SENSORS)) if rng.random() < args.incomplete else None
        incomplete += leave_out is not None
        for name, modality in SENSORS.items():
            events.append((start + args.window_s / 2, session, name, lambda seq, s=session, n=name, m=modality:
                           wire.SensorMessage(s, n, m, seq, start, kind="heartbeat")))
            if name == leave_out:
                events.append((end, session, name, lambda seq, s=session, n=name, m=modality:
                               wire.SensorMessage(s, n, m, seq, end, kind="heartbeat")))
            elif args.media:
                events += [(end if args.burst else at, session, name, make)
                           for at, make in media_events(session, name, start, args.window_s, rng)]
            else:
                vector = rng.normal(size=dims[modality])
                events.append((end, session, name, lambda seq, s=session, n=name, m=modality, v=vector:
                               wire.features_message(s, n, m, seq, start, v, duration=args.window_s)))
    events.sort(key=lambda event: event[0])  # (stable: a stream's messages keep their order)
    return events, incomplete


def ensure_bundle(path: str | None, workdir: Path, media: bool) -> Path:
    if path:
        return Path(path)
    from mmfuse.training.data import make_synthetic
    from mmfuse.training.train import main as train

    if media:
        from mmfuse.training.media import make_synthetic_media

        manifest = make_synthetic_media(workdir / "media")
        train(["--data", str(manifest), "--out", str(workdir / "bundle"), "--restorers", "zero,mean",
               "--tower-epochs", "1", "--encoder-epochs", "5", "--head-epochs", "5", "--context", "0"])
        return workdir / "bundle"

    data = make_synthetic(workdir / "synthetic.npz")
    train(["--data", str(data), "--out", str(workdir / "bundle"), "--restorers", "zero,mean,dropout,autoencoder,retrieval",
           "--encoder-epochs", "10", "--restorer-epochs", "10", "--head-epochs", "10"])
    return workdir / "bundle"


def spread(latencies: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(latencies, 50)), 2), "p99": round(float(np.percentile(latencies, 99)), 2),
            "max": round(float(np.max(latencies)), 2)}


def report(result: dict, path: str) -> None:
    """Print the figures and write them as JSON."""
    print(json.dumps(result, indent=2))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def live_lab(workdir: Path, bundle_path: Path, window_s: float, restorer: str, context: zmq.Context,
             shared_model_process: bool = False):
    """A daemon configuration on free ports, written to workdir, with the sensors' XPUB sockets bound and a
    decision subscriber connected: (configuration path, sockets by sensor, listener)."""
    ports = {name: free_port() for name in SENSORS}
    output = f"tcp://127.0.0.1:{free_port()}"
    config = {"bundle": str(bundle_path),
              "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{ports[n]}"}
                          for n, m in SENSORS.items()],
              "window": {"length_s": window_s, "hop_s": window_s}, "drop": {"timeout_s": 1.0},
              "restorer": {"method": restorer}, "output": {"endpoint": output},
              "log": {"stats_interval_s": 3600}, "pipeline": {"shared_model_process": shared_model_process}}
    config_path = workdir / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config))
    sockets = {}
    for name, port in ports.items():
        sockets[name] = context.socket(zmq.XPUB)
        sockets[name].setsockopt(zmq.SNDHWM, 0)
        sockets[name].bind(f"tcp://127.0.0.1:{port}")
    listener = context.socket(zmq.SUB)
    listener.setsockopt(zmq.SUBSCRIBE, b"decision/")
    listener.connect(output)
    return config_path, sockets, listener


def start_daemon(config_path: Path) -> tuple[subprocess.Popen, list[str]]:
    """`mmfuse-daemon` on this configuration, with its JSON log lines collected as they come."""
    daemon = subprocess.Popen([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(config_path),
                               "--log-json"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log_lines: list[str] = []
    threading.Thread(target=lambda: log_lines.extend(daemon.stderr), daemon=True).start()
    return daemon, log_lines


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mmfuse-bench-"))
    bundle_path = ensure_bundle(args.bundle, workdir, args.media)
    args.json = args.json or str(ROOT / "bench" / "results" / f"e2e_latency{'_media' if args.media else ''}.json")
    dims = {m: spec["dim"] for m, spec in load_bundle(bundle_path).modalities.items()}
    context = zmq.Context()
    config_path, sockets, listener = live_lab(workdir, bundle_path, args.window_s, args.restorer, context,
                                              args.shared_model_process)

    daemon, log_lines = start_daemon(config_path)
    try:
        for sock in sockets.values():
            if not sock.poll(180_000):
                print("daemon did not subscribe:\n" + "".join(log_lines[-40:]), file=sys.stderr)
                daemon.kill()
                return 1
            sock.recv()
        time.sleep(0.5)

        rng = np.random.default_rng(0)
        windows = int(args.duration_s / args.window_s)
        sessions = [f"bench{i:02d}" for i in range(args.sessions)]
        sent_at: dict[tuple[str, int], float] = {}
        received: dict[tuple[str, int], tuple[float, dict]] = {}
        duplicates = 0
        incomplete = 0
        peak = {}
        seq = {(s, n): 0 for s in sessions for n in SENSORS}

        def drain(until: float) -> None:
            """Take the decisions that have come, and those that come until `until`."""
            nonlocal duplicates
            while True:
                while True:
                    try:
                        frames = listener.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = time.monotonic()
                    decision = wire.decode_decision(frames)
                    key = (decision["session"], decision["window"]["id"])
                    duplicates += key in received
                    received[key] = (now, decision)
                timeout = until - time.monotonic()
                if timeout <= 0 or not listener.poll(timeout * 1000):
                    return

        schedule = [window_events(k, sessions, args, dims, rng) for k in range(windows)]  # (made before: the
        start = time.monotonic()                                    # load generator shares the daemon's cores)
        for k, (events, left_out) in enumerate(schedule):
            incomplete += left_out
            sample_at = (k + 0.5) * args.window_s if k % 5 == 0 else math.inf
            for at, session, name, make in events:
                if at >= sample_at:  # the tree's memory, at mid-window: reading it costs the cores ~30 ms
                    peak, sample_at = peak_memory(peak, tree_memory_mb(daemon.pid)), math.inf
                drain(start + at)
                sockets[name].send_multipart(wire.encode(make(seq[session, name])))
                seq[session, name] += 1
                sent_at[(session, k)] = time.monotonic()  # (the last message of the window: it can close)
        drain(time.monotonic() + 3.0)
        elapsed = time.monotonic() - start

        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        time.sleep(0.2)
        (workdir / "daemon.log").write_text("".join(log_lines))
        final = next((json.loads(line) for line in log_lines if line.startswith("{") and '"stopped"' in line), {})
        sensors = [v for k, v in final.items() if k.startswith("sensor-") and isinstance(v, dict)]
        calls = (sum(s.get("pushes", 0) for s in sensors) + final.get("aligner", {}).get("calls_out", 0)
                 + final.get("restorer", {}).get("batches", 0) + final.get("fusion", {}).get("batches", 0))
        closed = final.get("aligner", {}).get("closed", 0)

        latency = {key: (received[key][0] - sent) * 1000 for key, sent in sent_at.items() if key in received}
        warm = math.ceil(args.warm_up_s / args.window_s) - 1  # the last window that ends within the warm-up
        steady = [ms for (_, k), ms in latency.items() if k > warm]
        internal = np.array([d["latency_ms"] for _, d in received.values()])
        result = {
            "sessions": args.sessions, "window_s": args.window_s, "duration_s": args.duration_s,
            "windows_per_s": round(args.sessions / args.window_s, 2),
            "incomplete_fraction": round(incomplete / max(1, len(sent_at)), 3),
            "restorer": args.restorer, "media": args.media, "shared_model_process": args.shared_model_process,
            "windows_sent": len(sent_at), "decisions": len(received), "duplicates": duplicates,
            "missing": sorted(f"{s}/{k}" for s, k in sent_at if (s, k) not in received)[:20],
            "latency_ms": {**spread(list(latency.values())),
                           "after_warm_up": {"windows": len(steady), "from_window": warm + 1, **spread(steady)}},
            "daemon_internal_latency_ms": {"p50": round(float(np.percentile(internal, 50)), 2),
                                           "p99": round(float(np.percentile(internal, 99)), 2)},
            "decisions_per_s": round(len(received) / elapsed, 2),
            "ray_calls_per_window": round(calls / closed, 3) if closed else None,
            "daemon_memory_mb": {"peak_sampled": peak, "at_exit": {k: final.get(k) for k in ("rss_mb", "pss_mb")}},
            "daemon_exit_code": daemon.returncode,
            "daemon_log": str(workdir / "daemon.log"),
            "aligner": final.get("aligner"),
            "cpu": os.cpu_count(),
        }
    finally:
        if daemon.poll() is None:
            daemon.kill()
    report(result, args.json)
    context.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
