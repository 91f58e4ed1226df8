"""Ingest ceiling of a live daemon: N feature streams at increasing message rates, every loss by reason.

    python bench/ingest.py --streams 144 --rates 5000 10000 20000 40000 50000 --step-s 20

For each rate a fresh `mmfuse-daemon` (features bundle, `mean` restorer) takes `--streams` streams (sessions of
three sensors: visual, audio, text), each sending small `features` messages at rate / streams per second in real
time, every session's windows complete. At the end of the step every stream sends `end`, the daemon is stopped
and its final stats read. Per rate: messages sent; accepted by the sensor actors; rejected and unsupported by
reason; sequence gaps (messages lost before the daemon saw them); messages the aligner counted late; windows
decided (until the daemon has drained and stopped: a window not decided by then is lost), degraded ones (decided
without a modality that was sent for them) and those whose decision names `seq_gaps`; decision latency from the
window's end to its decision arriving (p50, p99); the daemon's memory
(whole process tree, peak of samples: RSS summed, and PSS, which counts each shared page once); and the share of
one core the sender itself used (it runs on the same cores as the daemon, so it encodes every message of a step
before the step starts and only sends while the clock runs).

The same run first measures this machine's raw pyzmq PUB -> SUB rate for the same messages between two
processes, so each figure reads as a share of what ZeroMQ itself does here. Writes JSON (default
bench/results/ingest.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_latency import SENSORS, ensure_bundle, free_port, live_lab, peak_memory, start_daemon  # noqa: E402
from mmfuse import wire  # noqa: E402
from mmfuse.bundle import load_bundle  # noqa: E402
from mmfuse.daemon.main import tree_memory_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=144, help="streams in all (a multiple of 3: sessions x 3)")
    parser.add_argument("--rates", type=int, nargs="+", default=[5000, 10000, 20000, 40000, 50000],
                        help="messages per second over all streams, one step each")
    parser.add_argument("--step-s", type=float, default=20.0, help="sending time of each step")
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--bundle", default=None, help="features bundle; default: train one on generated data")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "ingest.json"))
    return parser.parse_args()


def raw_receiver(endpoint: str, seconds: float, out) -> None:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoint)
    count, first, last = 0, None, None
    deadline = time.monotonic() + seconds + 5
    while time.monotonic() < deadline:
        if not sub.poll(500):
            if first is not None:
                break
            continue
        while True:
            try:
                sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            count += 1
            last = time.monotonic()
            first = first or last
    out.send((count, (last - first) if first and last else 0.0))
    context.destroy(linger=0)


def memory_sampler(pid: int, stop, out) -> None:
    """The peak memory of the daemon's process tree, sampled every 2 s in a process of its own: reading every
    process's smaps takes 60-90 ms here, which in the sender's loop paused every stream that long."""
    peak: dict[str, float] = {}
    while not stop.wait(2.0):
        peak = peak_memory(peak, tree_memory_mb(pid))
    out.send(peak)


def raw_pyzmq_rate(seconds: float, dim: int) -> dict:
    """Messages per second one PUB process gets to one SUB process here, with the bench's own messages."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    parent, child = multiprocessing.Pipe()
    receiver = multiprocessing.Process(target=raw_receiver, args=(endpoint, seconds, child))
    receiver.start()
    time.sleep(1.0)
    frames = wire.encode(wire.features_message("raw", "cam0", "visual", 0, 0.0, np.zeros(dim), duration=0.01))
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(1000):
            pub.send_multipart(frames)
        sent += 1000
    received, span = parent.recv()
    receiver.join()
    context.destroy(linger=0)
    return {"sent": sent, "received": received, "messages_per_s": round(received / span) if span else None}


def run_step(rate: int, args, bundle: Path, dims: dict[str, int], workdir: Path) -> dict:
    context = zmq.Context()
    config_path, sockets, listener = live_lab(workdir, bundle, args.window_s, "mean", context)
    daemon, log_lines = start_daemon(config_path)
    try:
        for sock in sockets.values():
            if not sock.poll(180_000):
                raise RuntimeError("daemon did not subscribe:\n" + "".join(log_lines[-40:]))
            sock.recv()
        time.sleep(0.5)
        sessions = [f"s{i:03d}" for i in range(args.streams // len(SENSORS))]
        streams = [(s, name) for s in sessions for name in SENSORS]
        per_stream = rate / len(streams)          # messages per second of one stream
        period = 1.0 / per_stream
        payloads = {m: wire.features_message("", "", m, 0, 0.0, np.random.default_rng(0).normal(size=d))
                    for m, d in dims.items()}
        count = int(args.step_s / period) + 2
        encoded = [[wire.encode(wire.SensorMessage(s, name, SENSORS[name], k, k * period, encoding="features",
                                                   data=payloads[SENSORS[name]].data,
                                                   shape=payloads[SENSORS[name]].shape, dtype="<f4",
                                                   duration=period))
                    for k in range(count)] for s, name in streams]  # before the clock starts: the sender
        # shares the daemon's two cores, and encoding as it sends would take a third of one at 20,000 messages/s
        gc.collect()
        gc.freeze()  # a full collection would walk the encoded messages while they are sent (36 ms at 20,000/s)
        received: dict[tuple[str, int], tuple[float, dict]] = {}
        duplicates = 0
        stop_listening = threading.Event()

        def listen():
            nonlocal duplicates
            while not stop_listening.is_set():
                if listener.poll(100):
                    while True:
                        try:
                            frames = listener.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        decision = wire.decode_decision(frames)
                        key = (decision["session"], decision["window"]["id"])
                        duplicates += key in received
                        received[key] = (time.monotonic(), decision)

        listening = threading.Thread(target=listen, daemon=True)
        listening.start()
        sent, seq = 0, 0
        window_end_at: dict[int, float] = {}
        stop_sampling, (peak_in, peak_out) = multiprocessing.Event(), multiprocessing.Pipe()
        sampler = multiprocessing.Process(target=memory_sampler, args=(daemon.pid, stop_sampling, peak_out))
        sampler.start()
        start, sender_cpu = time.monotonic(), time.thread_time()
        while (elapsed := time.monotonic() - start) < args.step_s:
            due = int(elapsed / period) + 1            # messages each stream should have sent by now
            for (s, name), frames in zip(streams, encoded):
                socket = sockets[name]
                for k in range(seq, due):
                    socket.send_multipart(frames[k])
                    sent += 1
            for w in range(int(seq * period / args.window_s), int(due * period / args.window_s)):
                window_end_at.setdefault(w, start + (w + 1) * args.window_s)
            seq = due
            time.sleep(0.002)
        sender_cpu = time.thread_time() - sender_cpu
        gc.unfreeze()
        stop_sampling.set()
        peak = peak_in.recv()
        sampler.join()
        for s, name in streams:
            sockets[name].send_multipart(wire.encode(wire.SensorMessage(s, name, SENSORS[name], seq, seq * period,
                                                                        kind="end")))
        time.sleep(3 * args.window_s + 2.0)
        daemon.send_signal(signal.SIGTERM)  # its drain decides every window still open: listen until it is out
        daemon.wait(timeout=120)
        time.sleep(0.5)
        stop_listening.set()
        listening.join()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        context.destroy(linger=0)
    (workdir / f"daemon-{rate}.log").write_text("".join(log_lines))
    final = next((json.loads(line) for line in log_lines if line.startswith("{") and '"stopped"' in line), {})
    sensors = {k: v for k, v in final.items() if k.startswith("sensor-") and isinstance(v, dict)}
    full_windows = int(seq * period / args.window_s)  # windows every stream covered completely
    decided = [d for (s, w), (_, d) in received.items() if w < full_windows]
    degraded = [d for d in decided if d["dropped"] or d["restored"]]
    gapped = [d for d in decided if d.get("seq_gaps")]
    latencies = np.array([(at - window_end_at[d["window"]["id"]]) * 1000 for (s, w), (at, d) in received.items()
                          if w < full_windows and w in window_end_at])

    def summed(key):
        return sum(v.get(key, 0) for v in sensors.values())

    def by_reason(key):
        total: dict[str, int] = {}
        for v in sensors.values():
            for reason, n in v.get(key, {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    accepted = summed("accepted")
    return {
        "rate": rate, "streams": len(streams), "step_s": args.step_s, "sent": sent,
        "sent_per_s": round(sent / args.step_s), "sender_cpu_share": round(sender_cpu / args.step_s, 3),
        "accepted": accepted,
        "ends_sent": len(streams),
        "unaccounted": sent + len(streams) - accepted - sum(by_reason("rejected").values())
        - sum(by_reason("unsupported").values()),
        "rejected": by_reason("rejected"), "unsupported": by_reason("unsupported"), "seq_gaps": summed("seq_gaps"),
        "late": final.get("aligner", {}).get("late"), "pushes_per_s": round(summed("pushes") / args.step_s, 1),
        "windows_expected": full_windows * len(sessions), "windows_decided": len(decided),
        "windows_degraded": len(degraded), "windows_with_seq_gaps": len(gapped), "duplicates": duplicates,
        "degraded_window_ids": dict(sorted(Counter(d["window"]["id"] for d in degraded).items())[:20]),
        "degraded_modalities": dict(Counter(m for d in degraded for m in {*d["dropped"], *d["restored"]})),
        "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 1),
                       "p99": round(float(np.percentile(latencies, 99)), 1)} if len(latencies) else None,
        "daemon_memory_mb": {"peak_sampled": peak, "at_exit": {k: final.get(k) for k in ("rss_mb", "pss_mb")}},
        "daemon_exit_code": daemon.returncode,
    }


def main() -> int:
    args = parse_args()
    if args.streams % len(SENSORS):
        print(f"--streams must be a multiple of {len(SENSORS)}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mmfuse-ingest-"))
    bundle = ensure_bundle(args.bundle, workdir, media=False)
    dims = {m: spec["dim"] for m, spec in load_bundle(bundle).modalities.items()}
    result = {"streams": args.streams, "cpu": os.cpu_count(), "raw_pyzmq": raw_pyzmq_rate(5.0, dims["visual"]),
              "steps": []}
    print(f"raw pyzmq PUB->SUB here: {result['raw_pyzmq']['messages_per_s']} messages/s; daemon logs in {workdir}",
          flush=True)
    for rate in args.rates:
        step = run_step(rate, args, bundle, dims, workdir)
        result["steps"].append(step)
        print(json.dumps(step), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
