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

from mmfuse.options import positive_int, proportion


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory made by mmfuse-train")
    parser.add_argument("--data", help="features npz of the training schema, or a media JSONL manifest")
    parser.add_argument("--restorer", default="all", help="a restorer of the bundle, or all")
    parser.add_argument("--protocol", choices=["fixed", "rate", "missing", "both"], default="both",
                        help="both: fixed, rate and missing")
    parser.add_argument("--eta", type=proportion, default=0.7, help="share of samples with a missing modality in `missing`")
    parser.add_argument("--seeds", type=positive_int, default=5, help="mask seeds of the rate protocol")
    parser.add_argument("--subset", choices=["all", "validation"], default="all",
                        help="validation: only the videos the bundle held out when it was trained")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads; none: OMP_NUM_THREADS, else 1")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--report", help="write a markdown report with plots into this directory")
    logs = parser.add_argument_group("evaluation from a recording (mmfuse-record's MCAP)")
    logs.add_argument("--log", help="run the pipeline on this recording, on its own clock")
    logs.add_argument("--labels", help="CSV with rows session,start,end,label (sensors' time)")
    logs.add_argument("--config", help="daemon configuration (default: the one recorded)")
    logs.add_argument("--decisions-out", help="write every decision as one JSON line")
    args = parser.parse_args(argv)
    for option, path in (("--json", args.json), ("--decisions-out", args.decisions_out)):
        if path is not None and Path(path).is_dir():
            parser.error(f"{option} {path} is a directory; give the file to write, e.g. {Path(path) / 'out.json'}")
    if args.report is not None and Path(args.report).exists() and not Path(args.report).is_dir():
        parser.error(f"--report {args.report} is a file; give the directory to write the report into")
    if args.log is None and (args.bundle is None or args.data is None):
        parser.error("give --bundle and --data, or --log (with --labels to score it)")
    return args


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
    from mmfuse.bundle import BundleError
    from mmfuse.config import ConfigError
    from mmfuse.datasets import DataError
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
    if not result["decisions"]:
        print(f"error: {result['why_none']}", file=sys.stderr)
        return 1
    return 0


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmfuse.bundle import BundleError
    from mmfuse.datasets import DataError
    from mmfuse.inference import limit_threads
    from mmfuse.training.evaluation import evaluate

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
