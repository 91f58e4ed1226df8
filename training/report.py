"""`mmfuse-eval --report DIR`: a markdown report with plots of how a model does under missing modalities."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmfuse.training.metrics import CLASSIFICATION, HEADLINE, REGRESSION  # noqa: E402

METRICS = {"classification": CLASSIFICATION, "regression": REGRESSION}
SUMMARY_KEYS = {"fixed": "mean6", "rate": "0.5"}


def write_report(out_dir: Path, result: dict, projections: dict[str, dict]) -> Path:
    """Write out_dir/report.md and PNG plots beside it; return the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    restorers: dict[str, dict] = result["restorers"]
    metric = HEADLINE[result["task"]][0]
    lines = [
        "# Missing-modality report",
        "",
        f"- bundle: `{result['bundle']}`",
        f"- data: `{result['data']}`",
        f"- task: {result['task']} (headline metric: `{_axis_label(metric)}`)",
        f"- mask seeds: {result['seeds']}",
    ]
    if _columns(restorers, "rate"):
        _plot_rate(out_dir / "rate.png", restorers, metric)
        lines += _section("Random missing rate", "rate", restorers, result["task"])
        lines += [
            "![headline metric against missing rate](rate.png)",
            "",
            f"`{metric}` on the test set with modalities hidden at random at the given missing rate; "
            "the shaded band is ± one standard deviation over mask seeds.",
        ]
    if _columns(restorers, "fixed"):
        _plot_fixed(out_dir / "fixed.png", restorers, metric)
        lines += _section("Fixed modality subsets", "fixed", restorers, result["task"])
        lines += [
            "![headline metric per available-modality condition](fixed.png)",
            "",
            f"`{metric}` when only the named modalities (a = audio, v = visual, t = text) are available."
            + (" `mean6` averages the six conditions with at least one modality missing."
               if "mean6" in _columns(restorers, "fixed") else ""),
        ]
    reliable = {name: runs["reliability"] for name, runs in restorers.items() if "reliability" in runs}
    if reliable:
        _plot_reliability(out_dir / "reliability.png", reliable)
        _plot_risk_coverage(out_dir / "risk_coverage.png", reliable)
        lines += ["", "## Calibration", ""]
        lines += _table(["restorer", "ece (full)", "ece (mean6)", "acc_at_80 (full)", "acc_at_80 (mean6)"], [
            [name, *(_cell(runs.get("fixed", {}).get(c), m) for m in ("ece", "acc_at_80") for c in ("full", "mean6"))]
            for name, runs in restorers.items() if name in reliable])
        lines += [
            "",
            "![reliability diagrams](reliability.png)",
            "",
            "Scores are calibrated per presence pattern (the bundle's temperatures). Each point is a bin of "
            "windows by their top score: its mean score against how often the label was right; on the diagonal "
            "a score is a probability. `ece` is the rows-weighted gap over 10 bins.",
            "",
            "![risk against coverage](risk_coverage.png)",
            "",
            "Error rate on the share of windows kept when the least confident are left out (abstained on); "
            "`acc_at_80` is one minus the risk at 80 % coverage.",
        ]
    if projections:
        _plot_projections(out_dir / "projection.png", projections)
        lines += [
            "",
            "## Restored embeddings",
            "",
            "![real vs restored embeddings, PCA](projection.png)",
            "",
            "Test-set embeddings of the hidden modality, real and as produced by each restorer, "
            "projected on the first two principal components of the real points.",
        ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _section(title: str, protocol: str, restorers: dict[str, dict], task: str) -> list[str]:
    """Headline table over all columns of a protocol, then all metrics at its summary column."""
    metric = HEADLINE[task][0]
    lines = ["", f"## {title}", "", f"`{_axis_label(metric)}`", ""]
    lines += _table(["restorer", *_columns(restorers, protocol)], [
        [name, *(_cell(runs.get(protocol, {}).get(col), metric) for col in _columns(restorers, protocol))]
        for name, runs in restorers.items()
    ])
    key = SUMMARY_KEYS[protocol]
    if key in _columns(restorers, protocol):
        label = "mean6" if protocol == "fixed" else f"rate {key}"
        lines += ["", f"All metrics at {label}:", ""]
        lines += _table(["restorer", *METRICS[task]], [
            [name, *(_cell(runs.get(protocol, {}).get(key), m) for m in METRICS[task])]
            for name, runs in restorers.items()
        ])
    return lines + [""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell(entry: dict | None, metric: str) -> str:
    if not entry or metric not in entry:
        return "–"
    std = entry.get(f"{metric}_std")
    return f"{entry[metric]:.3f}" if std is None else f"{entry[metric]:.3f} ± {std:.3f}"


def _columns(restorers: dict[str, dict], protocol: str) -> list[str]:
    """Condition names (in order of first appearance) or rates (ascending) present for any restorer."""
    columns: list[str] = []
    for runs in restorers.values():
        columns += [key for key in runs.get(protocol, {}) if key not in columns and key != "full"]
    return sorted(columns, key=float) if protocol == "rate" else columns


def _axis_label(metric: str) -> str:
    lower = any(name == metric and sign < 0 for name, sign in HEADLINE.values())
    return f"{metric} ({'lower' if lower else 'higher'} is better)"


def _plot_rate(path: Path, restorers: dict[str, dict], metric: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, runs in restorers.items():
        entries = runs.get("rate", {})
        rates = sorted(entries, key=float)
        x = np.array([float(r) for r in rates])
        y = np.array([entries[r][metric] for r in rates])
        std = np.array([entries[r].get(f"{metric}_std", 0.0) for r in rates])
        line, = ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, y - std, y + std, color=line.get_color(), alpha=0.2)
    ax.set(title=f"{metric} against missing rate (band: ± 1 std over seeds)",
           xlabel="missing rate", ylabel=_axis_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(title="restorer")
    _save(fig, path)


def _plot_fixed(path: Path, restorers: dict[str, dict], metric: str) -> None:
    conditions = _columns(restorers, "fixed")
    x = np.arange(len(conditions))
    width = 0.8 / len(restorers)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(conditions) + 2), 4.5))
    for i, (name, runs) in enumerate(restorers.items()):
        entries = runs.get("fixed", {})
        heights = [entries.get(c, {}).get(metric, np.nan) for c in conditions]
        ax.bar(x + (i - (len(restorers) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, conditions)
    ax.set(title=f"{metric} per available-modality condition",
           xlabel="available modalities (a = audio, v = visual, t = text)", ylabel=_axis_label(metric))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="restorer", loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def _plot_reliability(path: Path, reliable: dict[str, dict]) -> None:
    parts = [p for p in ("complete", "incomplete") if any(p in r for r in reliable.values())]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        for name, curves in reliable.items():
            if part in curves:
                ax.plot(curves[part]["bin_confidence"], curves[part]["bin_accuracy"], marker="o", label=name)
        ax.set(title=f"{part} windows", xlabel="mean top score in the bin", ylabel="accuracy in the bin",
               xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title="restorer", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Reliability of the calibrated scores")
    _save(fig, path)


def _plot_risk_coverage(path: Path, reliable: dict[str, dict]) -> None:
    parts = [p for p in ("complete", "incomplete") if any(p in r for r in reliable.values())]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for name, curves in reliable.items():
            if part in curves:
                ax.plot(curves[part]["coverage"], curves[part]["risk"], label=name)
        ax.axvline(0.8, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{part} windows", xlabel="coverage (share of windows decided)", ylabel="risk (error rate)",
               xlim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title="restorer", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Risk against coverage, most confident windows first")
    _save(fig, path)


def _plot_projections(path: Path, projections: dict[str, dict]) -> None:
    fig, axes = plt.subplots(1, len(projections), figsize=(4 * len(projections), 4), squeeze=False)
    for ax, (name, proj) in zip(axes[0], projections.items()):
        real, restored = _pca_2d(proj["real"], proj["restored"])
        ax.scatter(real[:, 0], real[:, 1], s=8, alpha=0.5, label="real")
        ax.scatter(restored[:, 0], restored[:, 1], s=8, alpha=0.5, label="restored")
        ax.set(title=f"{name} ({proj['modality']})", xlabel="PC 1", ylabel="PC 2")
        ax.legend()
    fig.suptitle("Real vs restored embeddings of the hidden modality (PCA fitted on real)")
    _save(fig, path)


def _pca_2d(real: np.ndarray, restored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project both sets on the first two principal axes of the real points."""
    mean = real.mean(axis=0)
    _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
    axes = vt[:2].T
    return (real - mean) @ axes, (restored - mean) @ axes


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
