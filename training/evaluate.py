"""`mmfuse-eval --bundle DIR --data FILE`: accuracy under missing modalities, two standard protocols.

fixed (MMIN's): every non-empty set of available modalities (a, v, t, av, at, vt,
avt) for all samples, and the mean over the incomplete sets (mean6 for three
modalities). rate: each (sample, modality) cell missing at rate r for r = 0.0 ...
0.7, never all modalities of a sample; the masks come from the seed alone and are
the same for every restorer. Rates above (M-1)/M cannot keep a modality in every
sample; they are capped there, and `realised_rate` says what was used.
missing (the DiT restorer paper's): a share eta (default 0.7) of the samples lacks one
given modality, the others complete; `mixed`: a share eta lacks one modality, split
evenly between the modalities (for image + text: half lose the image, half the text).
`both` runs all three. `fixed` always includes `full`, every available modality present.

--data takes an npz of the training schema or, for a bundle trained on raw media, a
JSONL manifest of the same format (paths relative to the manifest's folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmfuse import MODALITIES
from mmfuse.bundle import Bundle, BundleError, load_bundle
from mmfuse.inference import embed, limit_threads, predict
from mmfuse.datasets import DataError, FeatureSet, load_features
from mmfuse.calibration import row_temperatures, softmax
from mmfuse.training.metrics import calibration_metrics, reliability, score

RATES = tuple(round(0.1 * i, 1) for i in range(8))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory made by mmfuse-train")
    parser.add_argument("--data", help="features npz of the training schema, or a media JSONL manifest")
    parser.add_argument("--restorer", default="all", help="a restorer of the bundle, or all")
    parser.add_argument("--protocol", choices=["fixed", "rate", "missing", "both"], default="both",
                        help="both: fixed, rate and missing")
    parser.add_argument("--eta", type=float, default=0.7, help="share of samples with a missing modality in `missing`")
    parser.add_argument("--seeds", type=int, default=5, help="mask seeds of the rate protocol")
    parser.add_argument("--subset", choices=["all", "validation"], default="all",
                        help="validation: only the videos the bundle held out when it was trained")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; none: OMP_NUM_THREADS, else 1")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--report", help="write a markdown report with plots into this directory")
    logs = parser.add_argument_group("evaluation from a recording (mmfuse-record's MCAP)")
    logs.add_argument("--log", help="run the pipeline on this recording, on its own clock")
    logs.add_argument("--labels", help="CSV with rows session,start,end,label (sensors' time)")
    logs.add_argument("--config", help="daemon configuration (default: the one recorded)")
    logs.add_argument("--decisions-out", help="write every decision as one JSON line")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: give at least 1")
    if args.log is None and (args.bundle is None or args.data is None):
        parser.error("give --bundle and --data, or --log (with --labels to score it)")
    return args


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


def print_summary(result: dict) -> None:
    metric = "acc" if result["task"] == "classification" else "mae"
    print(f"{result['rows']} rows of {result['data']} ({result['subset']}), metric {metric}")
    for name, entry in result["restorers"].items():
        parts = []
        if "fixed" in entry:
            parts += [f"{c}={v[metric]:.3f}" for c, v in entry["fixed"].items()]
        if "rate" in entry:
            parts += [f"r{r}={v[metric]:.3f}" for r, v in entry["rate"].items()]
        if "missing" in entry:
            parts += [f"no-{c}@{entry['missing']['eta']}={v[metric]:.3f}" for c, v in entry["missing"].items()
                      if c != "eta"]
        print(f"  {name:<12} " + " ".join(parts))


def main_log(args: argparse.Namespace) -> int:
    from mmfuse.config import ConfigError
    from mmfuse.logs import configure
    from mmfuse.recording import RecordingError
    from mmfuse.training.log_eval import evaluate_log, print_log_summary

    configure(level="warning")  # the pipeline's per-stream info lines would drown the summary
    try:
        result = evaluate_log(args.log, args.labels, args.config, args.bundle, args.decisions_out)
    except (DataError, BundleError, ConfigError, RecordingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_log_summary(result)
    write_json(args.json, result)
    return 0


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    if args.log:
        return main_log(args)
    try:
        result, projections = evaluate(args)
    except (DataError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    write_json(args.json, result)
    if args.report:
        from mmfuse.training.report import write_report

        print(f"report: {write_report(Path(args.report), result, projections)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
