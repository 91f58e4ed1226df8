"""CPU per message of the sensor path and the aligner's snapshot, in one process (no daemon, no sockets).

    python bench/sensor_path.py

48 sessions of one 50 Hz stream each of 32-d features, as one sensor actor sees them: `wire.decode` by the
compiled decoder and key by key; `SensorIngest` message by message (`ingest`) and as the sensor actor handles a
read of up to 500 (`check` each, `check_values` together, `take` each), a batch taken after every read; and the
aligner's state copied for a snapshot (`Aligner.copy()`) against a deep copy. Best of five runs each. Writes JSON
(default bench/results/sensor_path.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import timeit
from pathlib import Path

import numpy as np
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmfuse import wire  # noqa: E402
from mmfuse.aligner import Aligner  # noqa: E402
from mmfuse.ingest import SensorIngest  # noqa: E402

SESSIONS, DIM, RATE, READ = 48, 32, 50, 500


def messages(seconds: int) -> list[list[bytes]]:
    rng = np.random.default_rng(0)
    return [wire.encode(wire.features_message(f"s{i:03d}", "cam0", "visual", k, k / RATE,
                                              rng.normal(size=DIM).astype(np.float32), duration=1 / RATE))
            for k in range(seconds * RATE) for i in range(SESSIONS)]


def ingest_us(frames: list[list[bytes]], together: bool) -> tuple[float, SensorIngest, list]:
    ingest, batches = SensorIngest("cam0", "visual", 1.0, 0.5, DIM), []
    arrival = 1_000.0
    start = time.perf_counter()
    for first in range(0, len(frames), READ):
        read = frames[first:first + READ]
        if together:
            for frame in ingest.check_values([ingest.check(f, arrival + (first + i) / (SESSIONS * RATE), None)
                                              for i, f in enumerate(read)]):
                ingest.take(frame)
        else:
            for i, f in enumerate(read):
                ingest.ingest(f, arrival + (first + i) / (SESSIONS * RATE))
        batches.append(ingest.take_batch())
    return (time.perf_counter() - start) / len(frames) * 1e6, ingest, batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4, help="stream time of the messages")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "sensor_path.json"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    frames = messages(args.seconds)
    one = frames[SESSIONS * 2]

    def best(stmt, number: int) -> float:
        return round(min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6, 2)

    aligner = Aligner(["visual"], {"cam0": "visual"}, 1.0, 0.5, 1.0)
    for batch in ingest_us(frames, together=True)[2]:
        if batch is not None:
            aligner.push(batch)
    result = {
        "messages": len(frames), "sessions": SESSIONS, "dim": DIM,
        "decode_us": {"compiled": best(lambda: wire.decode(one), 20_000),
                      "key_by_key": best(lambda: wire._checked(*one), 20_000)},
        "ingest_us": {"one_by_one": round(min(ingest_us(frames, False)[0] for _ in range(5)), 1),
                      "read_together": round(min(ingest_us(frames, True)[0] for _ in range(5)), 1)},
        "snapshot_ms": {"copy": round(best(aligner.copy, 20) / 1000, 3),
                        "deepcopy": round(best(lambda: copy.deepcopy(aligner), 20) / 1000, 3),
                        "open_windows": sum(len(s.windows) for s in aligner.sessions.values())},
    }
    print(json.dumps(result, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
