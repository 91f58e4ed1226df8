"""Ablation of the diffusion restorer on MOSI's clean dev file, with restoration latency.

    python bench/diffusion_ablation.py --seeds 0 1 2

With `--val` (default: mosi_dev.npz beside the training file, when it is there) stage 1 and every selection use
that file and the figures are measured on it; `--val ''` falls back to a split of whole videos of --data (which
leaks on mosi_train.npz: see the data README).

For each seed: stage 1 and the complete-data fusion head are trained once (a bundle
with the `zero` restorer only); then each denoiser variant is trained on the
training embeddings and judged by what the complete-data head makes of its
restorations on the validation split (acc over the six incomplete conditions,
`mean6`) and by the restoration error of the missing tokens. Variants: the four
conditionings (gating, adaln, concat, none; all with mutual learning), gating
without mutual learning, the ADMC inpainting sampler, and DDIM at 5/10/20/50/100
steps, whose latency per window is timed at batch 1 and 32 on this machine.
Prints a markdown table and writes JSON (default bench/results/diffusion_ablation.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmfuse.bundle import load_bundle
from mmfuse.diffusion import DiffusionDenoiser
from mmfuse.inference import embed
from mmfuse.restorers import DiffusionRestorer
from mmfuse.datasets import data_dir, load_features
from mmfuse.training.data import split_by_video
from mmfuse.diffusion_training import train_diffusion
from mmfuse.training.metrics import score
from mmfuse.training.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
INCOMPLETE = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)]
STEPS = (5, 10, 20, 50, 100)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(data_dir() / "mosi" / "mosi_train.npz"))
    parser.add_argument("--val", default=None, help="validation features npz; none: mosi_dev.npz beside --data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=150, help="L_base epochs (as mmfuse-train's default)")
    parser.add_argument("--mutual-epochs", type=int, default=50)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "diffusion_ablation.json"))
    args = parser.parse_args()
    if args.val is None:
        dev = Path(args.data).with_name("mosi_dev.npz")
        args.val = str(dev) if dev.is_file() else ""
    return args


def evaluate(restorer, head, z_val, y_val) -> dict:
    accs, errors = [], []
    for pattern in INCOMPLETE:
        present = torch.tensor(pattern, dtype=torch.bool).expand(len(z_val), -1)
        filled = restorer.restore(z_val, present).filled
        with torch.no_grad():
            accs.append(score(head(filled).numpy(), y_val, "classification")["acc"])
        missing = (~present).unsqueeze(-1)
        errors.append(float(((filled - z_val).square() * missing).sum() / (missing.sum() * z_val.shape[-1])))
    return {"mean6_acc": float(np.mean(accs)), "mse": float(np.mean(errors))}


def latency_ms(restorer, z, batch: int, repeats: int = 10) -> float:
    present = torch.tensor([True, True, False]).expand(batch, -1)
    sample = z[:batch]
    restorer.restore(sample, present)
    start = time.perf_counter()
    for _ in range(repeats):
        restorer.restore(sample, present)
    return (time.perf_counter() - start) / repeats * 1000


def run_seed(args, seed: int, workdir: Path) -> dict:
    bundle_dir = workdir / f"stage1_s{seed}"
    train_main(["--data", args.data, "--out", str(bundle_dir), "--seed", str(seed), "--restorers", "zero",
                *(["--val", args.val] if args.val else [])])
    bundle = load_bundle(bundle_dir)
    data = load_features(args.data)
    z, _ = embed(bundle.encoders(), data.features, bundle.modality_order, len(data), bundle.manifest["embed_dim"])
    if args.val:
        validation = load_features(args.val)
        z_train, y_val = z, validation.label
        z_val = embed(bundle.encoders(), validation.features, bundle.modality_order, len(validation),
                      bundle.manifest["embed_dim"])[0]
    else:
        train_idx, val_idx = split_by_video(data.videos, 0.2, seed)
        z_train, z_val, y_val = z[train_idx], z[val_idx], data.label[val_idx]
    head = bundle.head("complete")
    prior = z_train.mean(dim=0)
    results = {}

    def train_variant(conditioning: str, mutual: int) -> DiffusionDenoiser:
        torch.manual_seed(seed)
        model = DiffusionDenoiser(3, bundle.manifest["embed_dim"], conditioning=conditioning)
        probe = DiffusionRestorer(model, prior, steps=10)
        val_present = torch.tensor([1, 1, 0], dtype=torch.bool).expand(len(z_val), -1)

        def validate():
            missing = (~val_present).unsqueeze(-1)
            return -float(((probe.restore(z_val, val_present).filled - z_val).square() * missing).sum())

        started = time.monotonic()
        train_diffusion(model, z_train, args.epochs, mutual, 256, 1e-3, seed, validate, lambda epochs: epochs)
        print(f"  seed {seed} {conditioning} mutual={mutual}: trained in {time.monotonic() - started:.0f} s",
              file=sys.stderr, flush=True)
        return model.eval()

    for conditioning in DiffusionDenoiser.CONDITIONINGS:
        model = train_variant(conditioning, args.mutual_epochs)
        results[f"{conditioning}"] = evaluate(DiffusionRestorer(model, prior, steps=10), head, z_val, y_val)
        if conditioning == "gating":
            results["gating, admc sampler (n=50, 10 steps)"] = evaluate(
                DiffusionRestorer(model, prior, steps=10, mode="admc"), head, z_val, y_val)
            results["gating, 8 samples averaged"] = evaluate(
                DiffusionRestorer(model, prior, steps=10, samples=8), head, z_val, y_val)
            for steps in STEPS:
                restorer = DiffusionRestorer(model, prior, steps=steps)
                results[f"gating, {steps} steps"] = {
                    **evaluate(restorer, head, z_val, y_val),
                    "latency_ms_batch1": latency_ms(restorer, z_val, 1),
                    "latency_ms_batch32": latency_ms(restorer, z_val, 32)}
    results["gating, no mutual learning"] = evaluate(
        DiffusionRestorer(train_variant("gating", 0), prior, steps=10), head, z_val, y_val)
    return results


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="mmfuse-ablation-"))
    per_seed = {}
    for seed in args.seeds:  # each seed's figures are kept as soon as they exist
        per_seed[seed] = run_seed(args, seed, workdir)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"seeds": list(per_seed), "per_seed": per_seed}, indent=2) + "\n")
    variants = list(per_seed[args.seeds[0]])
    summary = {}
    print(f"\nvalidation: {args.val or 'a video split of ' + args.data}")
    print(f"seeds {args.seeds}; mean ± std over seeds; acc of the complete-data head on restored embeddings\n")
    print("| variant | mean6 acc | restoration MSE | latency batch 1 (ms) | latency batch 32 (ms) |")
    print("|---|---|---|---|---|")
    for variant in variants:
        entry = {}
        for key in per_seed[args.seeds[0]][variant]:
            values = [per_seed[s][variant][key] for s in args.seeds]
            entry[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        summary[variant] = entry

        def fmt(key, digits=3):
            return f"{entry[key]['mean']:.{digits}f} ± {entry[key]['std']:.{digits}f}" if key in entry else ""
        print(f"| {variant} | {fmt('mean6_acc')} | {fmt('mse')} | {fmt('latency_ms_batch1', 1)} | "
              f"{fmt('latency_ms_batch32', 1)} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"seeds": args.seeds, "per_seed": per_seed, "summary": summary,
                                           "val": args.val, "torch_threads": 1}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
