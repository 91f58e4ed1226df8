"""`mmfuse-train --data FILE --out DIR`: stage-wise training of a model bundle (the ADMC recipe).

Stage 1: one encoder per modality, each trained alone through its own head, then
frozen. Stage 2: the restorers, in that embedding space (mean, autoencoder,
retrieval, diffusion; zero and dropout need no fitting). Stage 3: fusion heads, one
trained on complete data (used with `zero` and `mean`), and one per learned restorer
on available + restored embeddings; then calibration, and where a restorer did worse
than zero-fill for a presence pattern it steps aside there. Every model is selected on the validation data,
never on test data: the `--val` file when given (never trained on), else a split of
whole videos of `--data`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmfuse.bundle import unreplaceable
from mmfuse.options import CONDITIONINGS, DISTILL_DEFAULTS, FUSION_HEADS, RESTORERS, SAMPLERS, count, \
    positive, positive_int, share, weight

DEFAULT_RESTORERS = ("zero", "mean", "dropout", "autoencoder", "retrieval")


class Help(argparse.RawDescriptionHelpFormatter):
    """The description as written, and after each option's help its default (none: the help says what then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-train", description=__doc__, formatter_class=Help)
    parser.add_argument("--data", required=True,
                        help="features npz (keys audio, video|visual, text, label, uid), or a media JSONL manifest "
                             "(rows id, label and any of image, text, audio)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--task", choices=["classification", "regression"], default="classification",
                        help="classify `label`, or regress `sentiment`")
    parser.add_argument("--task-name", default=None,
                        help="what the decisions are about (emotion, intent, sentiment, ...); none: sentiment "
                             "or emotion when the labels are such names, else classification")
    parser.add_argument("--seed", type=count, default=0, help="seed of every random draw: split, weights, batches")
    parser.add_argument("--restorers", default=",".join(DEFAULT_RESTORERS),
                        help=f"comma-separated subset of {', '.join(RESTORERS)}, or all; diffusion is left out by "
                             f"default: on clean data it restores worse than zero-fill and trains 5 times longer "
                             f"(docs/results.md)")
    parser.add_argument("--context", type=count, default=None,
                        help="feed the fusion heads the mean of the session's previous N windows (0: none); "
                             "none: 3 for media manifests whose rows form sessions (dialogues), else 0")
    parser.add_argument("--fusion", choices=FUSION_HEADS, default="mlp",
                        help="fusion head: mlp over the concatenated embeddings, or umca (Double-Flow "
                             "Self-Distillation's multi-view cross-attention; docs/models.md)")
    distill = parser.add_argument_group("double-flow self-distillation (heads trained on restored embeddings)")
    distill.add_argument("--self-distill", action="store_true",
                         help="train each restorer's head on a full and a missing flow, with a Modality "
                              "Imagination Autoencoder refining the restored embeddings, and the MKD, RS and "
                              "Rank-N-Contrast losses")
    distill.add_argument("--mkd-weight", type=weight, default=DISTILL_DEFAULTS["mkd"], help="weight of MKD")
    distill.add_argument("--rs-weight", type=weight, default=DISTILL_DEFAULTS["rs"], help="weight of RS")
    distill.add_argument("--rnc-weight", type=weight, default=DISTILL_DEFAULTS["rnc"], help="weight of Rank-N-Contrast")
    distill.add_argument("--rnc-temperature", type=positive, default=DISTILL_DEFAULTS["temperature"],
                         help="tau of Rank-N-Contrast's similarity -||vi - vj|| / tau")
    parser.add_argument("--step-aside", action=argparse.BooleanOptionalAction, default=True,
                        help="where a restorer does worse on the validation data than zero-fill for a presence "
                             "pattern, the bundle has it leave those windows to zero-fill and the complete-data "
                             "head (needs `zero` among --restorers)")
    parser.add_argument("--embed-dim", type=positive_int, default=64, help="size of each modality's embedding (stage 1)")
    parser.add_argument("--encoder-epochs", type=positive_int, default=60,
                        help="most epochs of each encoder (stage 1); the best on validation is kept")
    parser.add_argument("--restorer-epochs", type=positive_int, default=100, help="epochs of the autoencoder")
    parser.add_argument("--head-epochs", type=positive_int, default=60,
                        help="most epochs of each fusion head (stage 3); the best on validation is kept")
    parser.add_argument("--neighbours", type=positive_int, default=10, help="k of the retrieval restorer")
    parser.add_argument("--diffusion-epochs", type=positive_int, default=150, help="epochs of L_base")
    parser.add_argument("--mutual-epochs", type=count, default=50,
                        help="further epochs of L_base + L_mutual (0: no mutual learning)")
    parser.add_argument("--diffusion-conditioning", choices=CONDITIONINGS, default="gating",
                        help="how the denoiser sees the known modalities: gating (Dynamic Modality Gating), adaln, "
                             "concat, or none")
    parser.add_argument("--diffusion-width", type=positive_int, default=128, help="hidden width of the denoiser")
    parser.add_argument("--diffusion-depth", type=positive_int, default=3, help="blocks of the denoiser")
    parser.add_argument("--diffusion-steps", type=positive_int, default=10, help="sampling steps the bundle uses by default")
    parser.add_argument("--diffusion-mode", choices=SAMPLERS, default="ddim",
                        help="sampler the bundle uses by default: conditional DDIM, or ADMC's inpainting (the "
                             "known modalities re-imposed at every step)")
    media = parser.add_argument_group("raw media (JSONL manifests)")
    media.add_argument("--clip-model", default="mmfuse-tiny",
                       help="open_clip model name (ViT-B-32, ...) or a config shipped with mmfuse")
    media.add_argument("--pretrained", default=None,
                       help="open_clip checkpoint path, or a tag already in the offline cache; none: from scratch")
    media.add_argument("--tower-epochs", type=positive_int, default=8, help="epochs of each tower's supervised stage")
    media.add_argument("--contrastive-epochs", type=count, default=0,
                       help="epochs of open_clip's contrastive loss on image-text pairs first (0: none)")
    media.add_argument("--tower-lr", type=positive, default=None, help="learning rate of the towers; none: 5e-4 "
                       "from scratch, 1e-5 fine-tuning a --pretrained checkpoint")
    media.add_argument("--tower-batch-size", type=positive_int, default=64, help="batch size of the towers' training")
    parser.add_argument("--val", default=None, metavar="FILE",
                        help="features npz of the same schema that every selection (epochs, restorer states, "
                             "heads) is made on instead of a split of --data; never trained on. none: hold out "
                             "--val-fraction of the videos of --data")
    parser.add_argument("--val-fraction", type=share, default=0.2,
                        help="without --val: share of the videos of --data held out for validation")
    parser.add_argument("--lr", type=positive, default=1e-3, help="learning rate of every stage but the towers")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch size of every stage but the towers")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads of this training; none: OMP_NUM_THREADS, else 1 (see README, Training)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where every stage and the towers train: auto takes CUDA when torch finds a device")
    parser.add_argument("--if-changed", action="store_true",
                        help="train only if --out holds no bundle made from this data file with these arguments")
    args = parser.parse_args(argv)
    problem = unreplaceable(args.out)
    if problem:
        parser.error(f"--out: {problem}")
    args.restorers = list(RESTORERS) if args.restorers == "all" else [r.strip() for r in args.restorers.split(",")
                                                                       if r.strip()]
    if args.tower_lr is None:
        args.tower_lr = 1e-5 if args.pretrained else 5e-4
    unknown = [r for r in args.restorers if r not in RESTORERS]
    if unknown:
        parser.error(f"--restorers: unknown {', '.join(unknown)}; choose from {', '.join(RESTORERS)}")
    return args


def up_to_date(args: argparse.Namespace) -> bool:
    """Whether --out holds a bundle trained on the same data file (sha256) with the same arguments."""
    import json

    from mmfuse.bundle import sha256_file

    try:
        manifest = json.loads((Path(args.out) / "manifest.json").read_text())
        same_data = manifest["data"]["sha256"] == sha256_file(Path(args.data))
        if args.val is not None:
            same_data = same_data and manifest["data"]["val"]["sha256"] == sha256_file(Path(args.val))
    except (OSError, ValueError, KeyError):
        return False
    chosen = {k: v for k, v in vars(args).items()  # None: derived from the data and the rest, as it was then
              if k not in ("data", "out", "if_changed", "device", "threads") and v is not None}
    return same_data and all(manifest["training"].get(k) == v for k, v in chosen.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.if_changed and up_to_date(args):
        print(f"{args.out} is up to date: trained on this {args.data} with these arguments; nothing to do")
        return 0
    from mmfuse.datasets import DataError
    from mmfuse.inference import limit_threads, resolve_device
    from mmfuse.training.trainer import Trainer

    limit_threads(args.threads)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        print(f"error: --{exc}", file=sys.stderr)
        return 2
    try:
        manifest = Trainer(args).run()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bundle {manifest['id']} written to {args.out}")
    metric = "acc" if manifest["output"] == "classification" else "mae"
    for name, conditions in manifest["metrics"]["validation"].items():
        print(f"  {name:<12} validation {metric}: " + ", ".join(
            f"{c}={v[metric]:.3f}" for c, v in conditions.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
