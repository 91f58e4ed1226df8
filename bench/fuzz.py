"""Malformed frames: how fast the decoder and a sensor's ingest turn them away, and why.

Generates N malformed sensor frames (numpy RNG, seeded): pure random bytes (1 to 3 frames),
random msgpack maps, and valid features messages of one camera stream with one field broken
so that the sensor must reject them: a wrong dimension, NaN or inf in the vector, a bad
version (True, 1.0, 2, "1", none), a topic that does not match, an overflowing shape
([2**62 + 1, 100] and the like), a negative seq, t in epoch milli- or nanoseconds, a
duration over a minute, a payload over the size limit. It measures frames per second
through `wire.decode` alone and through `SensorIngest.ingest` of a features sensor
(visual, dim 100), with the rejects by reason; and the same for N valid frames of that
stream (10 per second of stream time, features of dim 100) for comparison.

    python bench/fuzz.py --frames 100000 --seed 0

Prints the figures and writes them as JSON (default bench/results/fuzz.json).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

from e2e_latency import report
from mmfuse import wire
from mmfuse.ingest import SensorIngest
from mmfuse.logs import configure

ROOT = Path(__file__).resolve().parents[1]
DIM = 100
PERIOD = 0.1
START = 1_700_000_000.0  # daemon wall clock at stream time 0
KINDS = ("random_bytes", "random_map", "version", "topic", "dim", "nan", "shape", "negative_seq", "t_ms",
         "long_duration", "oversize")
FIELDS = ("v", "session", "source", "modality", "seq", "t", "kind", "encoding", "data", "duration", "shape",
          "dtype")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000, help="malformed frames, and as many valid ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the numpy RNG that draws the frames")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"), help="JSON written here")
    return parser.parse_args()


def valid_stream(count: int, rng) -> list[tuple[float, list[bytes]]]:
    """(arrival, frames) of one camera stream sending features of DIM every PERIOD s, 5 ms on the way."""
    events = []
    for seq in range(count):
        message = wire.features_message("s", "cam0", "visual", seq, seq * PERIOD,
                                        rng.normal(size=DIM).astype(np.float32), duration=PERIOD)
        events.append((START + (seq + 1) * PERIOD + 0.005, wire.encode(message)))
    return events


class Malformed:
    """Malformed frames drawn from templates of the valid stream's payloads."""

    def __init__(self, templates: list[dict], max_payload: int, rng):
        self.templates, self.rng = templates, rng
        rows = max_payload // (DIM * 4) + 1
        body = dict(templates[0], data=bytes(rows * DIM * 4), shape=[rows, DIM])
        self.oversize = [b"visual/s", msgpack.packb(body, use_bin_type=True)]  # one shared 8 MiB + 400 bytes

    def frames(self, kind: str) -> list[bytes]:
        rng = self.rng
        if kind == "random_bytes":
            return [rng.bytes(int(rng.integers(0, 256))) for _ in range(int(rng.integers(1, 4)))]
        if kind == "oversize":
            return self.oversize
        topic = b"visual/s"
        if kind == "random_map":
            keys = rng.choice(FIELDS, int(rng.integers(1, 6)), replace=False)
            values = [None, True, -1, 2**63, 1.5, math.nan, "visual", "", b"\x00" * 4, [1, 2], {"a": 1}]
            return [topic, msgpack.packb({str(k): values[int(rng.integers(len(values)))] for k in keys},
                                         use_bin_type=True)]
        body = dict(self.templates[int(rng.integers(len(self.templates)))])
        if kind == "version":
            value = [True, 1.0, 2, 0, "1", None, "missing"][int(rng.integers(7))]
            if value == "missing":
                del body["v"]
            else:
                body["v"] = value
        elif kind == "topic":
            topic = [b"", b"visual/s2", b"audio/s", b"text/s", b"visual/S", rng.bytes(8)][int(rng.integers(6))]
        elif kind == "dim":
            rows = int(rng.integers(1, 3))
            wrong = DIM + int(rng.choice([-1, 1])) * int(rng.integers(1, 60))
            body.update(data=np.ones((rows, wrong), "<f4").tobytes(), shape=[rows, wrong] if rows > 1 else [wrong])
        elif kind == "nan":
            vector = np.frombuffer(body["data"], "<f4").copy()
            vector[int(rng.integers(DIM))] = [math.nan, math.inf, -math.inf][int(rng.integers(3))]
            body["data"] = vector.tobytes()
        elif kind == "shape":
            body["shape"] = [[2**62 + 1, DIM], [2**60 + 1, DIM], [2**64 - 1, DIM], [DIM, 0], [1, 1, DIM],
                             [-1, DIM], []][int(rng.integers(7))]
        elif kind == "negative_seq":
            body["seq"] = -int(rng.integers(1, 2**62))
        elif kind == "t_ms":
            body["t"] = (START + body["t"]) * (1e3 if rng.random() < 0.5 else 1e9)
        elif kind == "long_duration":
            body["duration"] = body["duration"] * 1000 if rng.random() < 0.5 else float(rng.uniform(60.001, 1e6))
        return [topic, msgpack.packb(body, use_bin_type=True)]


def through_decode(frames: list[list[bytes]]) -> dict:
    rejected: dict[str, int] = {}
    start = time.perf_counter()
    for f in frames:
        try:
            wire.decode(f)
        except wire.WireError as exc:
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
    elapsed = time.perf_counter() - start
    return {"frames_per_s": round(len(frames) / elapsed), "seconds": round(elapsed, 3),
            "accepted": len(frames) - sum(rejected.values()), "rejected": dict(sorted(rejected.items()))}


def through_ingest(events: list[tuple[float, list[bytes]]]) -> dict:
    """Every frame into one features sensor; a batch is taken every 100 frames (not timed)."""
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, DIM)
    spent = 0.0
    for i, (arrived, f) in enumerate(events, 1):
        start = time.perf_counter()
        ingest.ingest(f, arrived)
        spent += time.perf_counter() - start
        if i % 100 == 0:
            ingest.take_batch()
    ingest.take_batch()
    held = sum(s.held is not None for s in ingest.streams.values())
    return {"frames_per_s": round(len(events) / spent), "seconds": round(spent, 3), "accepted": ingest.accepted,
            "held": held, "rejected": dict(sorted(ingest.rejected.counts.items()))}


def main() -> int:
    args = parse_args()
    configure("console", "error")  # the rejects' warnings (a few dozen lines) would bury the figures
    rng = np.random.default_rng(args.seed)
    valid = valid_stream(args.frames, rng)
    templates = [msgpack.unpackb(f[1], raw=False) for _, f in valid[:1000]]
    malformed = Malformed(templates, wire.DEFAULT_MAX_PAYLOAD, rng)
    kinds = [KINDS[int(k)] for k in rng.integers(0, len(KINDS), args.frames)]
    bad = [malformed.frames(kind) for kind in kinds]
    arrivals = START + rng.random(args.frames) * args.frames * PERIOD
    bad_events = sorted(zip(arrivals.tolist(), bad), key=lambda e: e[0])

    result = {
        "frames": args.frames, "seed": args.seed, "dim": DIM,
        "malformed": {"kinds": {k: kinds.count(k) for k in KINDS},
                      "mean_payload_bytes_without_oversize": round(float(np.mean(
                          [sum(map(len, f)) for f, k in zip(bad, kinds) if k != "oversize"])), 1),
                      "decode": through_decode(bad), "ingest": through_ingest(bad_events)},
        "valid": {"payload_bytes": len(valid[0][1][1]), "decode": through_decode([f for _, f in valid]),
                  "ingest": through_ingest(valid)},
        "cpu": os.cpu_count(), "python": platform.python_version(),
    }
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
