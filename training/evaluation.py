"""The evaluation itself (`mmfuse-eval` is its command line, mmfuse.training.evaluate): the masks of the
fixed, rate and missing protocols, and one bundle's restorers run under them on one data file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mmfuse import MODALITIES
from mmfuse.bundle import Bundle, BundleError, load_bundle
from mmfuse.inference import embed, predict
from mmfuse.datasets import DataError, FeatureSet, load_features
from mmfuse.calibration import row_temperatures, softmax
from mmfuse.training.metrics import calibration_metrics, reliability, score

RATES = tuple(round(0.1 * i, 1) for i in range(8))


def rate_mask(rows: int, modalities: int, rate: float, seed: int) -> np.ndarray:
    """Presence [rows, modalities]: round(rate * cells) cells missing, at least one present per row.

    Cells are visited in an order drawn from the seed and marked missing unless that
    would empty their row, so the realised rate is exact up to the cap (M-1)/M.
    """
    rng = np.random.default_rng([seed, int(round(rate * 1000))])
    present = np.ones((rows, modalities), dtype=bool)
    target = int(round(rate * rows * modalities))
    left_in_row = np.full(rows, modalities)
    removed = 0
    for cell in rng.permutation(rows * modalities):
        if removed == target:
            break
        row = cell // modalities
        if left_in_row[row] > 1:
            present[row, cell % modalities] = False
            left_in_row[row] -= 1
            removed += 1
    return present


def missing_mask(rows: int, modalities: int, eta: float, which: int | None, seed: int) -> np.ndarray:
    """Presence [rows, modalities]: round(eta * rows) rows lack modality `which` (None: one each, in turn)."""
    rng = np.random.default_rng([seed, int(round(eta * 1000)), 99 if which is None else which])
    present = np.ones((rows, modalities), dtype=bool)
    chosen = rng.permutation(rows)[:int(round(eta * rows))]
    lost = np.full(len(chosen), which) if which is not None else np.arange(len(chosen)) % modalities
    present[chosen, lost] = False
    return present


def condition_masks(modalities: list[str]) -> dict[str, np.ndarray]:
    """Every non-empty subset of modalities as a presence pattern, named by initials in a, v, t order."""
    masks = {}
    for size in range(1, len(modalities) + 1):
        for bits in range(1, 2 ** len(modalities)):
            pattern = [(bits >> i) & 1 == 1 for i in range(len(modalities))]
            if sum(pattern) == size:
                masks["".join(m[0] for m, on in zip(modalities, pattern) if on)] = np.array(pattern)
    return masks


def mean_metrics(entries: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([e[k] for e in entries])), 4) for k in entries[0]}


def mean_and_spread(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over mask seeds, and its standard deviation as `<metric>_std`."""
    return {**mean_metrics(runs), **{f"{k}_std": round(float(np.std([r[k] for r in runs])), 4) for k in runs[0]}}


class Evaluation:
    """One bundle on one data file: embeddings computed once, then any restorer under any mask."""

    def __init__(self, bundle: Bundle, data: FeatureSet):
        self.bundle = bundle
        self.order = bundle.modality_order
        available = [m for m in self.order if m in data.features]
        if not available:
            raise DataError(f"{data.path} has none of the bundle's modalities ({', '.join(self.order)})")
        for m in available:
            if data.features[m].shape[1] != bundle.modalities[m]["dim"]:
                raise DataError(f"{data.path}: {data.keys[m]} has {data.features[m].shape[1]} dims, bundle "
                                f"{bundle.id} expects {bundle.modalities[m]['dim']}")
        self.available = [m for m in MODALITIES if m in available]
        if bundle.manifest["output"] == "regression":
            if data.sentiment is None:
                raise DataError(f"{data.path}: bundle {bundle.id} regresses sentiment; the file has no `sentiment`")
            self.targets = data.sentiment
        else:
            self.targets = data.label
        self.data = data
        encoders = bundle.encoders()
        self.z, self.observed = embed(encoders, data.features, self.order, len(data), bundle.manifest["embed_dim"])
        self.previous = torch.from_numpy(data.previous_rows(bundle.context))
        self.complete_head = bundle.complete_head()

    def presence(self, pattern: np.ndarray) -> torch.Tensor:
        """Bundle-ordered presence for a pattern over `self.available` ([M'] or [N, M'])."""
        pattern = np.broadcast_to(pattern, (len(self.data), len(self.available)))
        present = np.zeros((len(self.data), len(self.order)), dtype=bool)
        for j, m in enumerate(self.available):
            present[:, self.order.index(m)] = pattern[:, j]
        return torch.from_numpy(present)

    def run(self, restorer_name: str, pattern: np.ndarray) -> tuple[dict[str, float], torch.Tensor, np.ndarray | None]:
        """Metrics, filled embeddings and (classification) calibrated probabilities of a restorer under a mask."""
        restorer = self.bundle.restorer(restorer_name)
        head = self.bundle.head(self.bundle.restorers[restorer_name]["head"])
        present = self.presence(pattern)
        outputs, restoration = predict(head, restorer, self.z, present, self.previous, self.complete_head)
        metrics = score(outputs.numpy(), self.targets, self.bundle.manifest["output"])
        probabilities = None
        if self.bundle.manifest["output"] == "classification":
            calibration = self.bundle.restorers[restorer_name]
            spread = None if restoration.spread is None else restoration.spread.numpy()
            probabilities = softmax(outputs.numpy(), row_temperatures(
                present.numpy(), self.order, calibration.get("temperatures", {}), spread,
                calibration.get("spread_gain", 0.0)))
            metrics |= calibration_metrics(probabilities, self.targets)
        return {k: round(v, 4) for k, v in metrics.items()}, restoration.filled, probabilities

    def fixed(self, restorer_name: str) -> dict[str, dict]:
        result = {name: self.run(restorer_name, mask)[0] for name, mask in condition_masks(self.available).items()}
        complete = "".join(m[0] for m in self.available)
        incomplete = [v for k, v in result.items() if k != complete]
        result["full"] = result[complete]
        if incomplete:
            result["mean6" if len(self.available) == 3 else "mean_incomplete"] = mean_metrics(incomplete)
        return result

    def reliability(self, restorer_name: str) -> dict[str, dict]:
        """Reliability diagram and risk-coverage curve (classification) of complete windows and of every
        incomplete condition pooled."""
        complete = "".join(m[0] for m in self.available)
        runs = {name: self.run(restorer_name, mask)[2] for name, mask in condition_masks(self.available).items()}
        result = {"complete": reliability(runs.pop(complete), self.targets)}
        if runs:
            result["incomplete"] = reliability(np.concatenate(list(runs.values())), np.tile(self.targets, len(runs)))
        return result

    def rate(self, restorer_name: str, seeds: int) -> dict[str, dict]:
        result = {}
        for rate in RATES:
            runs, realised = [], []
            for seed in range(seeds):
                mask = rate_mask(len(self.data), len(self.available), rate, seed)
                runs.append(self.run(restorer_name, mask)[0])
                realised.append(1 - mask.mean())
            entry = mean_and_spread(runs)
            entry["realised_rate"] = round(float(np.mean(realised)), 4)
            result[f"{rate:.1f}"] = entry
        return result

    def missing(self, restorer_name: str, eta: float, seeds: int) -> dict[str, dict]:
        result = {}
        for name, which in [*((m, j) for j, m in enumerate(self.available)), ("mixed", None)]:
            runs = [self.run(restorer_name, missing_mask(len(self.data), len(self.available), eta, which, seed))[0]
                    for seed in range(seeds)]
            result[name] = mean_and_spread(runs)
        return {"eta": eta, **result}

    def projection(self, restorer_name: str) -> dict:
        """Real embeddings of one modality against what the restorer makes of it when hidden."""
        modality = "text" if "text" in self.available else self.available[-1]
        pattern = np.array([m != modality for m in self.available])
        if not pattern.any():
            return {}
        _, filled, _ = self.run(restorer_name, pattern)
        i = self.order.index(modality)
        return {"real": self.z[:, i].numpy(), "restored": filled[:, i].numpy(), "modality": modality}


def select_rows(data: FeatureSet, bundle: Bundle, subset: str) -> FeatureSet:
    if subset == "all":
        return data
    held_out = set(bundle.manifest["data"]["val_videos"])
    index = np.flatnonzero([v in held_out for v in data.videos])
    if not len(index):
        raise DataError(f"no row of {data.path} belongs to the validation videos of bundle {bundle.id}")
    return data.rows(index)


def evaluate(args: argparse.Namespace) -> tuple[dict, dict]:
    bundle = load_bundle(args.bundle)
    if Path(args.data).suffix == ".jsonl":
        from mmfuse.training.media import bundle_media_features

        data = bundle_media_features(args.data, bundle)
    else:
        data = load_features(args.data)
    data = select_rows(data, bundle, args.subset)
    names = list(bundle.restorers) if args.restorer == "all" else [args.restorer]
    for name in names:
        if name not in bundle.restorers:
            raise BundleError(f"bundle {bundle.id} has no restorer {name!r}; it has {', '.join(bundle.restorers)}")
    evaluation = Evaluation(bundle, data)
    result = {"bundle": str(args.bundle), "data": str(args.data), "task": bundle.manifest["output"],
              "subset": args.subset, "rows": len(data), "modalities": evaluation.available, "seeds": args.seeds,
              "restorers": {}}
    protocols = [p for p in ("fixed", "rate", "missing") if args.protocol in (p, "both")
                 and (p == "fixed" or len(evaluation.available) > 1)]  # one modality cannot go missing
    runs = {"fixed": evaluation.fixed, "rate": lambda name: evaluation.rate(name, args.seeds),
            "missing": lambda name: evaluation.missing(name, args.eta, args.seeds)}
    steps = [(name, protocol) for name in names for protocol in protocols]
    projections = {}
    with Progress(len(steps)) as progress:
        for name, protocol in steps:
            progress.step(f"{name}, {protocol} protocol")
            result["restorers"].setdefault(name, {})[protocol] = runs[protocol](name)
            if protocol == "fixed" and result["task"] == "classification":
                result["restorers"][name]["reliability"] = evaluation.reliability(name)
            if args.report and protocol == protocols[-1] and len(evaluation.available) > 1:
                projections[name] = evaluation.projection(name)
    return result, {k: v for k, v in projections.items() if v}


class Progress:
    """A progress bar on a terminal; elsewhere (a log, CI) one plain line per step."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.total, self.done = total, 0
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="step", file=sys.stderr, disable=not self.terminal, desc="mmfuse-eval")

    def step(self, what: str) -> None:
        if self.done:
            self.bar.update()
        self.done += 1
        if self.terminal:
            self.bar.set_postfix_str(what)
        else:
            print(f"mmfuse-eval: {self.done}/{self.total} {what}", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.done:
            self.bar.update()
        self.bar.close()
