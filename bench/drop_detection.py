"""Dropped-sensor detection: delay and false drops under arrival jitter, learned period
against the fixed timeout.

    python bench/drop_detection.py

A stream sends one message per period (25 Hz camera frames, 10 Hz audio chunks, 2 Hz
feature vectors) for 60 s and then dies. Each message arrives after 5 ms plus a
jitter |N(0, sigma)|, in order (ZeroMQ keeps a connection's order, so a late message
holds back the ones after it). The daemon's own SensorIngest and Aligner run on a
simulated clock with the sensor actor's push cadence (10 ms batch interval, 200 ms
flush interval) and the aligner actor's 10 ms tick. Detection delay = time from the
last message's arrival to the aligner marking the source dropped; a false drop = the
source marked dropped while it was still sending. Fixed: `drop.timeout_s` 1.0 alone
(`period_factor: 0`); learned: the default `period_factor: 5` (a stream is dropped
after 5 of its median message intervals on its own clock, plus the spread of its
recent delivery delays and the flush interval, at most the timeout).
Prints a table and writes JSON (default bench/results/drop_detection.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mmfuse import wire
from mmfuse.aligner import Aligner
from mmfuse.ingest import SensorIngest
from mmfuse.logs import configure

ROOT = Path(__file__).resolve().parents[1]
TICK_S, BATCH_S, FLUSH_S, TIMEOUT_S = 0.01, 0.01, 0.2, 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--periods", type=float, nargs="+", default=[0.04, 0.1, 0.5])
    parser.add_argument("--jitters", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.1])
    parser.add_argument("--alive-s", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--factor", type=float, default=5.0, help="period_factor of the learned detector")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "drop_detection.json"))
    return parser.parse_args()


def simulate(period: float, jitter: float, factor: float, seed: int, alive_s: float) -> tuple[float, int]:
    """(detection delay in s, false drops) of one stream that dies after alive_s."""
    rng = np.random.default_rng(seed)
    sends = np.arange(0.0, alive_s, period)
    arrivals = np.maximum.accumulate(sends + 0.005 + np.abs(rng.normal(0.0, jitter, len(sends))))
    messages = [wire.encode(wire.features_message("s", "cam0", "visual", i, t, np.zeros(4), duration=period))
                for i, t in enumerate(sends)]
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, 4)
    aligner = Aligner(["visual"], {"cam0": "visual"}, 1.0, 1.0, TIMEOUT_S, session_idle_s=3600.0,
                      period_factor=factor, flush_s=FLUSH_S)
    last_push, false_drops, was_dropped, i = -np.inf, 0, False, 0
    for now in np.arange(0.0, arrivals[-1] + TIMEOUT_S + 0.5, TICK_S):
        while i < len(arrivals) and arrivals[i] <= now:
            ingest.ingest(messages[i], arrivals[i])
            i += 1
        if ingest.push_due(now - last_push, BATCH_S, FLUSH_S):
            batch = ingest.take_batch()
            if batch is not None:
                aligner.push(batch)
            last_push = now
        aligner.poll(now)
        dropped = "cam0" in aligner.sessions["s"].dropped if "s" in aligner.sessions else False
        if dropped and not was_dropped:
            if now < arrivals[-1]:
                false_drops += 1
            else:
                return now - arrivals[-1], false_drops
        was_dropped = dropped
    return np.inf, false_drops


def main() -> int:
    args = parse_args()
    configure(level="warning")
    rows = []
    for period in args.periods:
        for jitter in args.jitters:
            entry = {"period_s": period, "jitter_s": jitter}
            for name, factor in (("fixed", 0.0), ("learned", args.factor)):
                runs = [simulate(period, jitter, factor, seed, args.alive_s) for seed in range(args.seeds)]
                delays = [d for d, _ in runs]
                entry[name] = {"delay_ms_mean": round(1000 * float(np.mean(delays)), 1),
                               "delay_ms_max": round(1000 * float(np.max(delays)), 1),
                               "false_drops_per_min": round(sum(f for _, f in runs) / (args.seeds * args.alive_s / 60), 2)}
            rows.append(entry)
            print(entry, file=sys.stderr)
    print("| period | jitter σ | fixed: delay mean / max (ms) | fixed: false drops/min | "
          "learned: delay mean / max (ms) | learned: false drops/min |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['period_s'] * 1000:g} ms | {r['jitter_s'] * 1000:g} ms | "
              f"{r['fixed']['delay_ms_mean']} / {r['fixed']['delay_ms_max']} | {r['fixed']['false_drops_per_min']} | "
              f"{r['learned']['delay_ms_mean']} / {r['learned']['delay_ms_max']} | "
              f"{r['learned']['false_drops_per_min']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"timeout_s": TIMEOUT_S, "flush_s": FLUSH_S, "factor": args.factor,
                                           "alive_s": args.alive_s, "seeds": args.seeds, "rows": rows}, indent=2)
                               + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
