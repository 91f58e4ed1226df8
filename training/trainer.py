"""The training itself (`mmfuse-train` is its command line, mmfuse.training.train): stage 1 encoders, stage 2
restorers from the registry, stage 3 fusion heads, calibration, and the bundle."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmfuse import MODALITIES
from mmfuse.bundle import save_bundle
from mmfuse.calibration import fit_spread_gain, fit_temperature, pattern_name
from mmfuse.inference import embed, head_outputs, resolve_device, session_context
from mmfuse.models import FusionHead, ModalityEncoder, SingleModalityHead, build_encoder, build_fusion_head
from mmfuse.restorers import RESTORERS, FitData
from mmfuse.training.distill import DistillWeights, SelfDistillation
from mmfuse.datasets import DataError, FeatureSet, load_features
from mmfuse.training.data import split_by_video
from mmfuse.fitting import fit
from mmfuse.training.metrics import headline, score

SENTIMENT_LABELS = ["negative", "positive"]
SENTIMENT_NAMES = {"negative", "neutral", "positive"}
EMOTION_NAMES = {"angry", "anger", "disgust", "excited", "fear", "frustrated", "happy", "joy", "neutral", "sad",
                 "sadness", "surprise"}


@dataclass
class Split:
    """One side of the train/validation split, in embedding space once stage 1 is done."""
    data: FeatureSet
    targets: torch.Tensor
    previous: torch.Tensor          # [N, context] rows of the same video before each row, -1 where none
    z: torch.Tensor | None = None   # [N, M, E]


def all_patterns(num_modalities: int) -> torch.Tensor:
    """Every non-empty presence pattern, [2^M - 1, M] bool, complete last."""
    patterns = [p for p in itertools.product([False, True], repeat=num_modalities) if any(p)]
    return torch.tensor(patterns)


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self.media, self.media_weights = None, {}
        if Path(args.data).suffix == ".jsonl":
            from mmfuse.training.media import train_media_features

            dataset, self.media, self.media_weights = train_media_features(
                args, lambda videos: split_by_video(videos, args.val_fraction, args.seed, args.data), self.device)
        else:
            dataset = load_features(args.data)
        if args.task == "regression" and dataset.sentiment is None:
            raise DataError(f"{args.data}: --task regression needs a `sentiment` key")
        self.dataset = dataset
        self.modalities = [m for m in MODALITIES if m in dataset.features]
        if len(self.modalities) == 1 and args.restorers != ["zero"]:
            print(f"one modality ({self.modalities[0]}): nothing can go missing, so no restorer is trained",
                  file=sys.stderr)
            args.restorers = ["zero"]
        self.output = args.task
        self.num_outputs = int(dataset.label.max()) + 1 if self.output == "classification" else 1
        if self.output == "classification" and self.num_outputs < 2:
            raise DataError(f"{args.data}: every row has the same label: a classifier needs at least two classes")
        unused = sorted(set(range(self.num_outputs)) - set(dataset.label.tolist())) \
            if self.output == "classification" else []
        if unused:
            raise DataError(f"{args.data}: labels must be class indices 0..K-1 that all occur in the training data; "
                            f"{len(unused)} of 0..{self.num_outputs - 1} never do (e.g. {unused[0]}): a stray value, "
                            f"or classes to renumber")
        if args.context is None:  # measured: +2-3 points on IEMOCAP dialogues, nothing on MOSI (docs/results.md)
            args.context = 3 if self.media and len(set(dataset.videos)) < len(dataset) else 0
        if args.val is None:
            train_idx, val_idx = split_by_video(dataset.videos, args.val_fraction, args.seed, args.data)
            self.train, self.val = self._split(dataset, train_idx), self._split(dataset, val_idx)
        else:
            validation = self._validation_file(args.val)
            self.train = self._split(dataset, np.arange(len(dataset)))
            self.val = self._split(validation, np.arange(len(validation)))
        self.loss = nn.CrossEntropyLoss() if self.output == "classification" else nn.L1Loss()
        self.patterns = all_patterns(len(self.modalities)).to(self.device)
        self.heads: dict[str, FusionHead] = {}  # trained so far; "complete" first when a restorer uses it
        self.seconds: dict[str, float] = {}      # wall time of each stage

    def _validation_file(self, path: str) -> FeatureSet:
        """The --val file, checked against the training data: the same modalities and sizes, known labels."""
        if self.media:
            raise DataError("--val takes a features npz beside a features npz; a media manifest is validated on "
                            "a split of its own videos (--val-fraction)")
        validation = load_features(path)
        sizes = {m: x.shape[1] for m, x in self.dataset.features.items()}
        found = {m: x.shape[1] for m, x in validation.features.items()}
        if found != sizes:
            raise DataError(f"{path}: modalities {found} differ from those of {self.args.data} ({sizes}); --val "
                            f"needs the same features")
        if self.output == "classification" and validation.label.max() >= self.num_outputs:
            raise DataError(f"{path}: label {validation.label.max()} is beyond the classes of {self.args.data} "
                            f"(0..{self.num_outputs - 1})")
        if self.output == "regression" and validation.sentiment is None:
            raise DataError(f"{path}: --task regression needs a `sentiment` key in the --val file too")
        overlap = set(validation.videos) & set(self.dataset.videos)
        if overlap:
            raise DataError(f"{path}: videos {', '.join(sorted(overlap)[:3])} are in {self.args.data} too; a "
                            f"validation file must hold other videos")
        return validation

    def _split(self, data: FeatureSet, index: np.ndarray) -> Split:
        part = data.rows(index)
        targets = torch.from_numpy(part.label) if self.output == "classification" else \
            torch.from_numpy(part.sentiment).unsqueeze(1)
        previous = torch.from_numpy(part.previous_rows(self.args.context))
        return Split(part, targets.to(self.device), previous.to(self.device))

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs, targets)

    def _metrics(self, outputs: torch.Tensor, split: Split) -> dict[str, float]:
        targets = split.targets.squeeze(1) if self.output == "regression" else split.targets
        return score(outputs.cpu().numpy(), targets.cpu().numpy(), self.output)

    def _draw(self, patterns: torch.Tensor, n: int) -> torch.Tensor:
        """n presence patterns drawn from `patterns` with the training's generator."""
        return patterns[torch.from_numpy(self.rng.integers(len(patterns), size=n)).to(self.device)]

    def _batches(self, n: int):
        order = torch.from_numpy(self.rng.permutation(n)).to(self.device)
        return [order[i:i + self.args.batch_size] for i in range(0, n, self.args.batch_size)]

    # stage 1 ---------------------------------------------------------------------------------
    def train_encoder(self, modality: str) -> tuple[ModalityEncoder, dict]:
        x_train = torch.from_numpy(self.train.data.features[modality]).to(self.device)
        x_val = torch.from_numpy(self.val.data.features[modality]).to(self.device)
        encoder_args = {"in_dim": x_train.shape[1], "embed_dim": self.args.embed_dim}
        encoder = build_encoder("mlp", **encoder_args).to(self.device)
        encoder.standardize.mean.copy_(x_train.mean(dim=0))
        encoder.standardize.std.copy_(x_train.std(dim=0).clamp_min(1e-6))
        head = SingleModalityHead(self.args.embed_dim, self.num_outputs).to(self.device)
        optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=self.args.lr,
                                      weight_decay=1e-2)

        def train_epoch(_):
            for batch in self._batches(len(x_train)):
                loss = self._loss(head(encoder(x_train[batch])), self.train.targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        def validate():
            return headline(self._metrics(head(encoder(x_val)), self.val), self.output)

        fit([encoder, head], self.args.encoder_epochs, train_epoch, validate, f"stage 1: {modality} encoder")
        metrics = self._metrics(head(encoder(x_val)).detach(), self.val)
        return encoder, {"args": encoder_args, "validation": metrics}

    # stage 3 ---------------------------------------------------------------------------------
    def train_head(self, name: str, restorer, complete_only: bool) -> tuple[FusionHead, dict]:
        args = self.args
        distilled = args.self_distill and not complete_only
        head_args = {"num_modalities": len(self.modalities), "embed_dim": args.embed_dim,
                     "num_outputs": self.num_outputs, "context": args.context,
                     **({"imagination": True} if distilled else {})}
        head = build_fusion_head(args.fusion, **head_args).to(self.device)
        distillation = SelfDistillation(head, self._loss, DistillWeights(
            args.mkd_weight, args.rs_weight, args.rnc_weight, args.rnc_temperature),
            categorical=self.output == "classification").to(self.device) if distilled else None
        trained = distillation if distillation is not None else head
        optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=1e-2)
        z, n = self.train.z, len(self.train.z)
        videos = self.train.data.videos
        same_video = torch.from_numpy(videos[:, None] == videos[None, :]).to(self.device)

        def fill(present):  # a retrieval never takes a training sample's own video
            return restorer.restore(z, present, exclude=same_video).filled

        # A restorer restores a row alike every time (the diffusion noise is seeded by the row), so each row is
        # restored once under each pattern, not once per epoch: the same training, many times faster.
        # The missing flow of self-distillation draws incomplete patterns only; the full flow is `z` itself.
        patterns = self.patterns[-1:] if complete_only else self.patterns[:-1] if distilled else self.patterns
        with torch.no_grad():
            train_fills = torch.stack([fill(p.expand(n, -1)) for p in patterns])  # [P, N, M, E]
            val_fills = [(p, restorer.restore(self.val.z, p.expand(len(self.val.z), -1)).filled) for p in self.patterns
                         if p.all() or not complete_only]
        rows = torch.arange(n, device=self.device)
        full_context = session_context(z, self.train.previous) if args.context else None

        def train_epoch(_):
            if complete_only:
                filled, present = train_fills[0], patterns[0].expand(n, -1)
            else:
                drawn = torch.from_numpy(self.rng.integers(len(patterns), size=n)).to(self.device)
                filled, present = train_fills[drawn, rows], patterns[drawn]
            context = session_context(filled, self.train.previous) if args.context else None
            for batch in self._batches(n):
                batch_context = None if context is None else context[batch]
                if distillation is not None:
                    loss = distillation(z[batch], filled[batch], present[batch],
                                        None if full_context is None else full_context[batch], batch_context,
                                        self.train.targets[batch])
                else:
                    loss = self._loss(head(filled[batch], batch_context, present[batch]), self.train.targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        def validate():
            return float(np.mean([headline(self._val_metrics(head, p, filled), self.output)
                                  for p, filled in val_fills]))

        _, epoch = fit([trained], args.head_epochs, train_epoch, validate, f"stage 3: {name} head")
        return head, {"arch": args.fusion, "args": head_args, "epoch": epoch}

    def _val_metrics(self, head: FusionHead, pattern: torch.Tensor, filled: torch.Tensor) -> dict[str, float]:
        return self._metrics(self._val_outputs(head, pattern, filled), self.val)

    @torch.no_grad()
    def _val_outputs(self, head: FusionHead, pattern: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """A head's outputs on the validation rows restored under `pattern`; complete rows go to the complete
        head, as in the daemon (mmfuse.inference.predict)."""
        context = session_context(filled, self.val.previous) if head.context else None
        return head_outputs(head, filled, context, pattern.expand(len(filled), -1), self.heads.get("complete"))

    def validate_restorer(self, head: FusionHead, restorer) -> tuple[dict[str, dict], dict, list[tuple]]:
        """Validation metrics under every presence pattern (and their mean over the incomplete ones), for
        classification one temperature per pattern fitted on the same outputs (mmfuse.calibration), and where the
        restorer measures a spread, (pattern, logits, temperature, spread) of each incomplete pattern."""
        per_condition, temperatures, spreads = {}, {}, []
        targets = self.val.targets.cpu().numpy()
        for pattern in self.patterns:
            name = pattern_name(pattern.tolist(), self.modalities)
            restoration = restorer.restore(self.val.z, pattern.expand(len(self.val.z), -1))
            outputs = self._val_outputs(head, pattern, restoration.filled)
            per_condition[name] = self._metrics(outputs, self.val)
            if self.output == "classification":
                logits = outputs.cpu().numpy()
                temperatures[name] = round(fit_temperature(logits, targets), 4)
                if restoration.spread is not None and not bool(pattern.all()):
                    spreads.append((name, logits, temperatures[name], restoration.spread.cpu().numpy()))
        per_condition["mean_incomplete"] = self._mean_incomplete(per_condition)
        return per_condition, {"temperatures": temperatures} if temperatures else {}, spreads

    def fit_spread_gain(self, spreads: list[tuple], stepped_aside: list[str]) -> float | None:
        """The spread gain over the patterns the restorer keeps (where it steps aside there is no spread)."""
        kept = [entry for entry in spreads if entry[0] not in stepped_aside]
        if not kept:
            return None
        targets = self.val.targets.cpu().numpy()
        return round(fit_spread_gain(np.concatenate([logits for _, logits, _, _ in kept]), np.tile(targets, len(kept)),
                                     np.concatenate([np.full(len(targets), t) for _, _, t, _ in kept]),
                                     np.concatenate([spread for _, _, _, spread in kept])), 4)

    def step_aside(self, name: str, validation: dict[str, dict], restorer_info: dict[str, dict]) -> None:
        """Where a restorer and its head did worse on the validation data than zero-fill with the complete-data
        head, the bundle has it step aside for that presence pattern (mmfuse.restorers.SteppingAside): those
        windows get exactly what `zero` gives them, and its validation figures and temperature."""
        zero, info = validation["zero"], restorer_info[name]
        worse = [p for p, metrics in validation[name].items() if p != "mean_incomplete" and metrics
                 and headline(metrics, self.output) < headline(zero[p], self.output)]
        if not worse:
            return
        info["step_aside"] = worse
        for pattern in worse:
            validation[name][pattern] = dict(zero[pattern])
            if "temperatures" in info:
                info["temperatures"][pattern] = restorer_info["zero"]["temperatures"][pattern]
        validation[name]["mean_incomplete"] = self._mean_incomplete(validation[name])

    def _mean_incomplete(self, per_condition: dict[str, dict]) -> dict[str, float]:
        """Each metric's mean over the incomplete presence patterns ({} with one modality)."""
        incomplete = [v for k, v in per_condition.items() if k != "mean_incomplete" and len(k) < len(self.modalities)]
        return {m: float(np.mean([v[m] for v in incomplete])) for m in incomplete[0]} if incomplete else {}

    @contextlib.contextmanager
    def timed(self, stage: str):
        started = time.monotonic()
        yield
        self.seconds[stage] = round(time.monotonic() - started, 2)

    def fit_restorer(self, name: str) -> tuple[object, dict]:
        data = FitData(self.train.z, self.val.z, self.patterns[:-1], vars(self.args), self._draw, self._batches)
        return RESTORERS[name].fit(data)

    def run(self) -> dict:
        args = self.args
        encoders, encoder_info = {}, {}
        for modality in self.modalities:
            with self.timed(f"encoder_{modality}"):
                encoders[modality], encoder_info[modality] = self.train_encoder(modality)
        for split in (self.train, self.val):
            split.z, _ = embed(encoders, split.data.features, self.modalities, len(split.data), args.embed_dim)

        restorers, restorer_info = {}, {}
        for name in args.restorers:
            with self.timed(f"restorer_{name}"):
                restorers[name], restorer_info[name] = self.fit_restorer(name)

        heads, head_info = self.heads, {}
        for restorer in sorted(restorers.values(), key=lambda r: r.head != "complete"):  # complete head first
            if restorer.head not in heads:
                complete_only = restorer.head == "complete"
                with self.timed(f"head_{restorer.head}"):
                    heads[restorer.head], head_info[restorer.head] = self.train_head(restorer.head, restorer,
                                                                                    complete_only)

        validation = {}
        with self.timed("validation_and_calibration"):
            spreads = {}
            for name, restorer in restorers.items():
                validation[name], calibration, spreads[name] = self.validate_restorer(heads[restorer.head], restorer)
                restorer_info[name].update(calibration)
            if self.args.step_aside and "zero" in restorers:
                for name in restorers:
                    if name != "zero":
                        self.step_aside(name, validation, restorer_info)
            for name, entries in spreads.items():
                gain = self.fit_spread_gain(entries, restorer_info[name].get("step_aside", []))
                if gain is not None:
                    restorer_info[name]["spread_gain"] = gain
        return self._save(encoders, encoder_info, restorers, restorer_info, heads, head_info, validation)

    def _save(self, encoders, encoder_info, restorers, restorer_info, heads, head_info, validation) -> dict:
        args, dataset = self.args, self.dataset
        binary_sentiment = dataset.sentiment is not None and (self.output == "regression" or self.num_outputs == 2)
        labels = dataset.label_names or (SENTIMENT_LABELS if binary_sentiment
                                         else [f"class_{i}" for i in range(self.num_outputs)])
        manifest = {
            "id": f"{Path(args.out).name}-{dataset.sha256[:8]}-s{args.seed}",
            "task": args.task_name or ("sentiment" if binary_sentiment or set(labels) <= SENTIMENT_NAMES
                                       else "emotion" if set(labels) <= EMOTION_NAMES else "classification"),
            "output": self.output,
            "target": "label" if self.output == "classification" else "sentiment",
            "labels": labels,
            "embed_dim": args.embed_dim,
            "context": args.context,
            "modalities": {m: {"dim": int(dataset.features[m].shape[1]), "data_key": dataset.keys[m],
                               "encoder": {"arch": "mlp", "args": encoder_info[m]["args"]}}
                           for m in self.modalities},
            "heads": {name: {"arch": info["arch"], "args": info["args"]} for name, info in head_info.items()},
            "restorers": {name: {"head": restorers[name].head,
                                 **{k: info[k] for k in ("args", "temperatures", "spread_gain", "step_aside")
                                    if k in info}}
                          for name, info in restorer_info.items()},
            "data": {"path": str(dataset.path), "sha256": dataset.sha256, "rows": len(dataset),
                     "train_rows": len(self.train.data), "val_rows": len(self.val.data),
                     "val_videos": sorted(set(self.val.data.videos.tolist())),
                     **({"val": {"path": str(self.val.data.path), "sha256": self.val.data.sha256}}
                        if args.val else {})},
            "training": {**{k: v for k, v in vars(args).items() if k not in ("data", "out", "if_changed")},
                         "device_used": self.device.type,
                         "encoder_validation": {m: info["validation"] for m, info in encoder_info.items()},
                         "head_epochs_chosen": {name: info["epoch"] for name, info in head_info.items()},
                         "stage_seconds": self.seconds,
                         **{name: {k: v for k, v in restorer_info.get(name, {}).items()
                                   if k not in ("args", "temperatures", "spread_gain", "step_aside")}
                            for name in ("autoencoder", "diffusion") if name in restorer_info}},
            "metrics": {"validation": validation},
            **({"media": self.media} if self.media else {}),
        }
        weights = {**self.media_weights, **{f"encoder_{m}": e.state_dict() for m, e in encoders.items()}}
        weights.update({f"head_{name}": h.state_dict() for name, h in heads.items()})
        weights.update({f"restorer_{name}": r.state() for name, r in restorers.items() if r.state()})
        return save_bundle(args.out, manifest, weights).manifest
