"""`mmfuse-train --data FILE --out DIR`: train a model bundle from a feature data set.

Per-modality standardisation, an MLP fusion head trained with modality dropout
(a dropped modality is replaced by its training mean, as the `mean` restorer does
live), model selection on a validation split made of whole videos.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmfuse import MODALITIES
from mmfuse.bundle import save_bundle
from mmfuse.models import build_fusion_head
from mmfuse.training.data import DataError, FeatureSet, load_features, split_by_video

# label names of a binary data set that carries `sentiment` (label == sentiment >= 0)
SENTIMENT_LABELS = ["negative", "positive"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="features npz (keys audio, video|visual, text, label, uid)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout inside the fusion MLP")
    parser.add_argument("--modality-dropout", type=float, default=0.3,
                        help="chance that a training sample loses each modality (never all of them)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of videos held out for validation")
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser.parse_args(argv)


def conditions(modalities: list[str]) -> dict[str, tuple[str, ...]]:
    """Every non-empty set of available modalities, named by initials (a, v, t, av, ..., avt)."""
    result = {}
    for size in range(1, len(modalities) + 1):
        for subset in itertools.combinations(modalities, size):
            result["".join(m[0] for m in subset)] = subset
    return result


def random_presence(n: int, modalities: list[str], p_missing: float, rng: np.random.Generator) -> np.ndarray:
    """Bool [n, M]: each modality missing with p_missing, at least one present per row."""
    present = rng.random((n, len(modalities))) >= p_missing
    empty = ~present.any(axis=1)
    present[empty, rng.integers(len(modalities), size=empty.sum())] = True
    return present


def fill(features: dict[str, torch.Tensor], present: torch.Tensor, means: dict[str, torch.Tensor],
         modalities: list[str]) -> dict[str, torch.Tensor]:
    return {m: torch.where(present[:, i:i + 1], features[m], means[m]) for i, m in enumerate(modalities)}


@torch.no_grad()
def accuracy_by_condition(model: nn.Module, data: dict[str, torch.Tensor], labels: torch.Tensor,
                          fill_values: dict[str, torch.Tensor], modalities: list[str]) -> dict[str, float]:
    model.eval()
    result = {}
    for name, subset in conditions(modalities).items():
        present = torch.tensor([[m in subset for m in modalities]]).expand(len(labels), -1)
        predictions = model(fill(data, present, fill_values, modalities)).argmax(dim=-1)
        result[name] = round(float((predictions == labels).float().mean()), 4)
    full = "".join(m[0] for m in modalities)
    incomplete = [v for k, v in result.items() if k != full]
    result["mean_incomplete"] = round(float(np.mean(incomplete)), 4) if incomplete else result[full]
    return result


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    dataset = load_features(args.data)
    modalities = [m for m in MODALITIES if m in dataset.features]
    train_idx, val_idx = split_by_video(dataset.videos, args.val_fraction, args.seed)
    train_set, val_set = dataset.rows(train_idx), dataset.rows(val_idx)
    num_classes = int(dataset.label.max()) + 1
    labels = SENTIMENT_LABELS if dataset.sentiment is not None and num_classes == 2 else \
        [f"class_{i}" for i in range(num_classes)]

    def tensors(part: FeatureSet) -> dict[str, torch.Tensor]:
        return {m: torch.from_numpy(part.features[m]) for m in modalities}

    x_train, x_val = tensors(train_set), tensors(val_set)
    y_train, y_val = torch.from_numpy(train_set.label), torch.from_numpy(val_set.label)
    means = {m: x.mean(dim=0) for m, x in x_train.items()}
    stds = {m: x.std(dim=0).clamp_min(1e-6) for m, x in x_train.items()}
    zeros = {m: torch.zeros_like(v) for m, v in means.items()}
    dims = {m: x.shape[1] for m, x in x_train.items()}

    fusion_args = {"hidden": args.hidden, "dropout": args.dropout}
    model = build_fusion_head("mlp", dims, num_classes, **fusion_args)
    for m in modalities:
        model.standardize[m].mean.copy_(means[m])
        model.standardize[m].std.copy_(stds[m])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    class_weights = len(y_train) / (num_classes * torch.bincount(y_train, minlength=num_classes).clamp_min(1))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights.float())

    best = {"score": -1.0}
    batch = 64
    for epoch in tqdm(range(args.epochs), desc="fusion head", unit="epoch", file=sys.stderr):
        model.train()
        order = torch.from_numpy(rng.permutation(len(y_train)))
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            present = torch.from_numpy(random_presence(len(index), modalities, args.modality_dropout, rng))
            inputs = fill({m: x[index] for m, x in x_train.items()}, present, means, modalities)
            loss = loss_fn(model(inputs), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        metrics = accuracy_by_condition(model, x_val, y_val, means, modalities)
        full = metrics["".join(m[0] for m in modalities)]
        score = (full + metrics["mean_incomplete"]) / 2
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])

    manifest = {
        "id": f"{Path(args.out).name}-{dataset.sha256[:8]}-s{args.seed}",
        "task": "sentiment" if labels is SENTIMENT_LABELS else "classification",
        "head": "classification",
        "labels": labels,
        "modalities": {m: {"dim": dims[m], "data_key": dataset.keys[m]} for m in modalities},
        "fusion": {"arch": "mlp", "args": fusion_args},
        "restorers": ["zero", "mean"],
        "data": {"path": str(dataset.path), "sha256": dataset.sha256, "rows": len(dataset),
                 "train_rows": len(train_idx), "val_rows": len(val_idx),
                 "val_videos": sorted(set(val_set.videos.tolist()))},
        "training": {**{k: v for k, v in vars(args).items() if k not in ("data", "out")},
                     "best_epoch": best["epoch"]},
        "metrics": {"validation_accuracy": {
            "mean": accuracy_by_condition(model, x_val, y_val, means, modalities),
            "zero": accuracy_by_condition(model, x_val, y_val, zeros, modalities)}},
    }
    weights = {"fusion": model.state_dict(),
               "stats": {**{f"{m}.mean": means[m] for m in modalities}, **{f"{m}.std": stds[m] for m in modalities}}}
    bundle = save_bundle(args.out, manifest, weights)
    return bundle.manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = train(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    accuracy = manifest["metrics"]["validation_accuracy"]["mean"]
    print(f"bundle {manifest['id']} written to {args.out} (best epoch {manifest['training']['best_epoch']})")
    print("validation accuracy by available modalities (mean restorer): "
          + ", ".join(f"{k}={v:.3f}" for k, v in accuracy.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
