"""Markdown tables of restorers under both protocols, aggregated over several `mmfuse-eval --json` files.

    python bench/restorer_table.py out/results/mosi_s*.json

Each file is one bundle (one training seed) evaluated on its validation data;
cells are mean ± std over the files (fixed protocol) or over files and mask seeds
(rate protocol, whose per-file std is the spread over mask seeds).
"""

from __future__ import annotations

import json
import sys

import numpy as np

FIXED = ["a", "v", "t", "av", "at", "vt", "avt", "mean6"]
RATES = [f"{0.1 * i:.1f}" for i in range(8)]


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def rate_cell(entries: list[dict], metric: str) -> str:
    means = np.array([e[metric] for e in entries])
    within = np.array([e.get(f"{metric}_std", 0.0) for e in entries])
    total_std = np.sqrt(np.mean(within ** 2) + np.var(means))  # law of total variance over files and mask seeds
    return f"{means.mean():.3f} ± {total_std:.3f}"


def without_text(fixed: dict, metric: str) -> float:
    """Mean of a metric over the conditions that lack text (a, v, av): where restoring has the most to do."""
    return float(np.mean([fixed[c][metric] for c in ("a", "v", "av")]))


def metric_table(results: list[dict], restorers: list[str], metrics: tuple[str, ...]) -> None:
    """Further metrics of the fixed protocol, on complete windows and over the incomplete conditions."""
    columns = [(m, c) for m in metrics for c in ("full", "mean6")]
    print("\n| restorer | " + " | ".join(f"{m} ({c})" for m, c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in restorers:
        print(f"| {name} | " + " | ".join(cell([r["restorers"][name]["fixed"][c][m] for r in results])
                                         for m, c in columns) + " |")


def main(paths: list[str]) -> int:
    results = [json.loads(open(p).read()) for p in paths]
    metric = "acc" if results[0]["task"] == "classification" else "mae"
    restorers = list(results[0]["restorers"])
    print(f"{len(results)} bundle(s), metric `{metric}`, rows per validation split: "
          f"{', '.join(str(r['rows']) for r in results)}\n")
    columns = [c for c in FIXED if c in results[0]["restorers"][restorers[0]]["fixed"]]
    text = "t" in columns and "av" in columns
    print("| restorer | " + " | ".join(columns) + (" | no text (a, v, av)" if text else "") + " |")
    print("|---|" + "---|" * (len(columns) + text))
    for name in restorers:
        fixed = [r["restorers"][name]["fixed"] for r in results]
        cells = [cell([f[c][metric] for f in fixed]) for c in columns]
        if text:
            cells.append(cell([without_text(f, metric) for f in fixed]))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if metric == "mae":
        metric_table(results, restorers, ("corr", "acc2"))
    print("\n| restorer | " + " | ".join(f"r={r}" for r in RATES) + " |")
    print("|---|" + "---|" * len(RATES))
    for name in restorers:
        cells = [rate_cell([r["restorers"][name]["rate"][rate] for r in results], metric) for rate in RATES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "ece" in results[0]["restorers"][restorers[0]]["fixed"]["full"]:
        metric_table(results, restorers, ("ece", "acc_at_80"))
    realised = [results[0]["restorers"][restorers[0]]["rate"][rate]["realised_rate"] for rate in RATES]
    print("\nrealised missing rate: " + ", ".join(f"{r:.3f}" for r in realised))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
