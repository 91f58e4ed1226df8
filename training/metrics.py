"""Metrics of the field, computed by hand (no scikit-learn)."""

from __future__ import annotations

import numpy as np

CLASSIFICATION = ("acc", "f1_weighted", "ua")
REGRESSION = ("mae", "corr", "acc2")
HEADLINE = {"classification": ("acc", 1.0), "regression": ("mae", -1.0)}  # metric, sign (higher is better)


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, support-weighted F1, and unweighted accuracy (mean recall over classes present)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    f1s, recalls, supports = [], [], []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (truth == c))
        support = np.sum(truth == c)
        predicted_c = np.sum(predicted == c)
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        if support:
            recalls.append(recall)
        supports.append(support)
    return {"acc": float(np.mean(truth == predicted)),
            "f1_weighted": float(np.average(f1s, weights=supports)),
            "ua": float(np.mean(recalls))}


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Mean absolute error, Pearson correlation, and binary accuracy of the sign (>= 0 is positive)."""
    truth, predicted = np.asarray(truth, np.float64), np.asarray(predicted, np.float64)
    spread = truth.std() * predicted.std()
    corr = float(np.mean((truth - truth.mean()) * (predicted - predicted.mean())) / spread) if spread > 0 else 0.0
    return {"mae": float(np.mean(np.abs(truth - predicted))), "corr": corr,
            "acc2": float(np.mean((truth >= 0) == (predicted >= 0)))}


def score(outputs: np.ndarray, targets: np.ndarray, output: str) -> dict[str, float]:
    """Metrics of head outputs (logits [N, K] or values [N, 1]) against targets."""
    if output == "classification":
        return classification_metrics(targets, outputs.argmax(axis=1), outputs.shape[1])
    return regression_metrics(targets, outputs[:, 0])


def headline(metrics: dict[str, float], output: str) -> float:
    """One number to maximise in model selection."""
    name, sign = HEADLINE[output]
    return sign * metrics[name]


def calibration_metrics(probabilities: np.ndarray, truth: np.ndarray, bins: int = 10,
                        coverage: float = 0.8) -> dict[str, float]:
    """`ece`: expected calibration error over `bins` equal-width confidence bins (top-class confidence against
    accuracy, weighted by the bin's share of rows); `acc_at_80`: accuracy on the `coverage` share of rows with the
    highest confidence (what a system that abstains on the least certain 20 % gets right)."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(truth)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
              for b in range(bins) if np.any(which == b))
    kept = np.argsort(-confidence, kind="stable")[:max(1, int(np.ceil(coverage * len(confidence))))]
    return {"ece": float(ece), "acc_at_80": float(correct[kept].mean())}


def reliability(probabilities: np.ndarray, truth: np.ndarray, bins: int = 10) -> dict[str, list]:
    """Per confidence bin: mean confidence, accuracy and rows (a reliability diagram); and the risk–coverage
    curve: the error rate on the share of rows kept, most confident first."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(truth)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    used = [b for b in range(bins) if np.any(which == b)]
    order = np.argsort(-confidence, kind="stable")
    kept = np.arange(1, len(order) + 1)
    steps = np.unique(np.linspace(0, len(order) - 1, 50).astype(int))
    return {"bin_confidence": [round(float(confidence[which == b].mean()), 4) for b in used],
            "bin_accuracy": [round(float(correct[which == b].mean()), 4) for b in used],
            "bin_rows": [int(np.sum(which == b)) for b in used],
            "coverage": [round(float(kept[i] / len(order)), 4) for i in steps],
            "risk": [round(float(1 - np.cumsum(correct[order])[i] / kept[i]), 4) for i in steps]}
