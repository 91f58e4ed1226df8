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
