"""Restoration latency per window of a bundle's restorers on this machine (one torch thread,
as in the restorer actor): batch 1 and batch 32, diffusion at several step counts.

    python bench/restore_latency.py --bundle models/mosi

Prints a table and writes JSON (default bench/results/restore_latency.json). Run it on
an otherwise idle machine: timings under load say nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmfuse.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(ROOT / "models" / "mosi"))
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "restore_latency.json"))
    return parser.parse_args()


def time_ms(restorer, batch: int, width: int, embed_dim: int, repeats: int, device: str) -> float:
    z = torch.randn(batch, width, embed_dim)
    present = torch.ones(batch, width, dtype=torch.bool)
    present[:, -1] = False
    restorer.restore(z, present)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        restorer.restore(z, present)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    width, embed_dim = len(bundle.modalities), bundle.manifest["embed_dim"]
    rows = []
    for name in bundle.restorers:
        variants = [{"steps": s} for s in args.steps] if name == "diffusion" else [{}]
        for overrides in variants:
            restorer = bundle.restorer(name, **overrides)
            if name == "diffusion":
                restorer.model.to(args.device)
            timings = {f"batch{b}_ms": round(time_ms(restorer, b, width, embed_dim, args.repeats, args.device), 2)
                       for b in args.batches}
            rows.append({"restorer": name, **overrides, **timings})
    print("| restorer | steps | " + " | ".join(f"batch {b} (ms/batch)" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for row in rows:
        print(f"| {row['restorer']} | {row.get('steps', '')} | "
              + " | ".join(f"{row[f'batch{b}_ms']:.2f}" for b in args.batches) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"bundle": str(args.bundle), "device": args.device, "threads": 1,
                                           "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
