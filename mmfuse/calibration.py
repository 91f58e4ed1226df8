"""Calibrated scores under every missing pattern: temperature scaling (Guo et al. 2017) with one temperature per
presence pattern, fitted by mmfuse-train on its validation data and kept in the bundle per restorer.

A head's logits on a window are divided by the temperature of the modalities the window has before the softmax,
so a score of 0.8 means right about 80 % of the time whether the window is complete or restored. Dividing by a
positive number never changes the argmax: accuracy is untouched.

A restorer that measures how much its candidates disagree (retrieval's neighbours, diffusion's samples) has
its spread feed the confidence: a row's temperature is the pattern's times (1 + gain * spread), the gain fitted
on the same validation outputs (0 when spread does not help there), so a window whose restoration is uncertain
gets a softer score.
"""

from __future__ import annotations

import numpy as np

TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 301))  # the grid a temperature is chosen from


def pattern_name(present: list[bool], order: list[str]) -> str:
    """A presence pattern named by the initials of its modalities in bundle order (a, v, t)."""
    return "".join(m[0] for m, on in zip(order, present) if on)


SPREAD_GAINS = np.concatenate([[0.0], np.exp(np.linspace(np.log(0.01), np.log(100.0), 81))])


def row_temperatures(present: np.ndarray, order: list[str], temperatures: dict[str, float],
                     spread: np.ndarray | None = None, spread_gain: float = 0.0) -> np.ndarray:
    """[N] temperature of each row of a presence matrix [N, M] (1 for a pattern without one), raised by the
    row's restoration spread [N] where there is one."""
    base = np.array([temperatures.get(pattern_name(row, order), 1.0) for row in np.asarray(present, dtype=bool)])
    return base if spread is None else base * (1 + spread_gain * np.asarray(spread, np.float64))


def softmax(logits: np.ndarray, temperature: np.ndarray | float = 1.0) -> np.ndarray:
    """Probabilities of logits [N, K] at a temperature, one for all rows or one per row ([N])."""
    t = np.asarray(temperature, np.float64)
    scaled = np.asarray(logits, np.float64) / (t[:, None] if t.ndim else t)
    scaled -= scaled.max(axis=-1, keepdims=True)
    p = np.exp(scaled)
    return p / p.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: np.ndarray | float) -> float:
    return float(-np.log(softmax(logits, temperature)[np.arange(len(targets)), targets] + 1e-12).mean())


def fit_spread_gain(logits: np.ndarray, targets: np.ndarray, temperatures: np.ndarray, spread: np.ndarray) -> float:
    """The gain of the grid (0 included) whose temperatures * (1 + gain * spread) give `targets` the lowest
    negative log-likelihood; `temperatures` [N] are each row's pattern temperature."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets)
    losses = [nll(logits, targets, temperatures * (1 + gain * spread)) for gain in SPREAD_GAINS]
    return float(SPREAD_GAINS[int(np.argmin(losses))])


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature of the grid with the lowest negative log-likelihood of `targets`. Where every row is
    right the likelihood only grows as the temperature falls (to scores of 0 and 1): no evidence to calibrate
    on, so 1."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets)
    if np.all(logits.argmax(axis=1) == targets):
        return 1.0
    return float(TEMPERATURES[int(np.argmin([nll(logits, targets, t) for t in TEMPERATURES]))])
