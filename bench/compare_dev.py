"""One table comparing several `bench/dev_selection.py` experiments restorer by restorer (mean ± std over seeds).

    python bench/compare_dev.py cls-mlp cls-umca cls-mlp-sd cls-umca-sd

Reads out/dev/NAME/s*.json. Columns: complete windows (avt), mean6, windows without text (a, v, av), and the rate
protocol at r = 0.5; `acc` for classification, `mae` for regression (lower is better).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main(names: list[str]) -> int:
    print("| experiment | restorer | complete (avt) | mean6 | no text (a, v, av) | rate 0.5 |")
    print("|---|---|---|---|---|---|")
    for name in names:
        runs = [json.loads(p.read_text()) for p in sorted((ROOT / "out" / "dev" / name).glob("s*.json"))]
        if not runs:
            print(f"no results in out/dev/{name}", file=sys.stderr)
            return 2
        metric = "acc" if runs[0]["task"] == "classification" else "mae"
        for restorer in runs[0]["restorers"]:
            entries = [r["restorers"][restorer] for r in runs]
            fixed = [e["fixed"] for e in entries]
            print(f"| {name} | {restorer} | {cell([f['avt'][metric] for f in fixed])} | "
                  f"{cell([f['mean6'][metric] for f in fixed])} | "
                  f"{cell([np.mean([f[c][metric] for c in ('a', 'v', 'av')]) for f in fixed])} | "
                  f"{cell([e['rate']['0.5'][metric] for e in entries])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
