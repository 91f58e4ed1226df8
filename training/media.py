"""Stage 1 for raw modalities: the media towers, trained on a raw-media manifest (its format:
mmfuse.datasets).

Training a bundle on a manifest first trains the towers (open_clip image and text
towers, the audio tower), each alone through its own classification head, optionally
after a contrastive image-text stage with open_clip's loss; then the towers' outputs
become the feature set that the rest of `mmfuse-train` works on as it does on npz files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import wave
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmfuse.bundle import Bundle, sha256_file
from mmfuse.datasets import (MEDIA_KEYS, DataError, FeatureSet, MediaRow, manifest_modalities, read_image, read_manifest,
                             read_wav)
from mmfuse.media import split_segments
from mmfuse.towers import TowerError, build_towers, clip_config, preprocess_config, resolve_pretrained
from mmfuse.fitting import fit


class TowerInputs:
    """Every row's tower input, read once: pixels, tokens, waveforms."""

    def __init__(self, rows: list[MediaRow], towers: dict[str, nn.Module]):
        self.pixels = self.tokens = self.waves = None
        chunk = 256
        if "visual" in towers:
            self.pixels = torch.cat([towers["visual"].prepare([read_image(r.image) for r in rows[i:i + chunk]])
                                     for i in tqdm(range(0, len(rows), chunk), desc="reading images",
                                                   file=sys.stderr, leave=False)])
        if "text" in towers:
            self.tokens = towers["text"].prepare([r.text for r in rows])
        if "audio" in towers:
            self.waves = [read_wav(r.audio, towers["audio"].rate) for r in rows]

    def batch(self, modality: str, index: torch.Tensor, tower: nn.Module, rng: np.random.Generator | None):
        """Inputs of rows `index` on the tower's device; with `rng`, training augmentation (flips, random audio
        crops)."""
        return self._batch(modality, index, tower, rng).to(tower.device)

    def _batch(self, modality: str, index: torch.Tensor, tower: nn.Module, rng: np.random.Generator | None):
        if modality == "visual":
            pixels = self.pixels[index]
            if rng is not None:
                flip = torch.from_numpy(rng.random(len(index)) < 0.5)
                pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            return pixels
        if modality == "text":
            return self.tokens[index]
        crops = []
        for i in index.tolist():
            wave_ = self.waves[i]
            start = int(rng.integers(0, max(1, len(wave_) - tower.segment_samples + 1))) if rng is not None else 0
            crops.append(wave_[start:start + tower.segment_samples])
        return tower.prepare(crops)

    @torch.no_grad()
    def features(self, modality: str, tower: nn.Module) -> np.ndarray:
        tower.eval()
        if modality == "audio":  # segments as the daemon cuts them, averaged by their length as a window does
            vectors = []
            for wave_ in self.waves:
                segments = split_segments(wave_, tower.segment_samples, tower.rate)
                weights = np.array([seconds for _, seconds in segments])
                vectors.append(weights @ tower.encode([w for w, _ in segments]) / weights.sum())
            return np.stack(vectors)
        data = self.pixels if modality == "visual" else self.tokens
        return torch.cat([tower(data[i:i + 256].to(tower.device)).cpu() for i in range(0, len(data), 256)]).numpy()


def media_spec(args: argparse.Namespace, modalities: list[str]) -> tuple[dict, str | None]:
    """What the bundle records so the daemon rebuilds exactly the trained towers; the local checkpoint."""
    checkpoint = None
    spec = {"towers": {m: {"visual": "clip_image", "text": "clip_text", "audio": "audio"}[m] for m in modalities},
            "frames_per_window": 1}
    if {"visual", "text"} & set(modalities):
        try:
            config = clip_config(args.clip_model)
            checkpoint = resolve_pretrained(args.clip_model, args.pretrained)
            preprocess = preprocess_config(args.clip_model, args.pretrained, config)
        except TowerError as exc:
            raise DataError(str(exc)) from None
        spec["clip"] = {"model": args.clip_model, "pretrained": args.pretrained, "config": config, "preprocess": preprocess,
                        "context_length": config["text_cfg"].get("context_length", 77)}
    if "audio" in modalities:
        spec["audio"] = {"args": {"rate": 16000, "segment_s": 1.0, "n_mels": 64, "width": 128, "out_dim": 128}}
    return spec, checkpoint


def contrastive_stage(towers, inputs: TowerInputs, train_idx: np.ndarray, epochs: int, args, rng) -> None:
    """open_clip's contrastive loss on the training image-text pairs."""
    from open_clip.loss import ClipLoss

    clip = towers["text"].clip
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=args.tower_lr, weight_decay=0.1)
    clip.train()
    for _ in tqdm(range(epochs), desc="stage 1: contrastive image-text", unit="epoch", file=sys.stderr, leave=False):
        order = torch.from_numpy(rng.permutation(train_idx))
        for i in range(0, len(order), args.tower_batch_size):
            index = order[i:i + args.tower_batch_size]
            image = nn.functional.normalize(towers["visual"](inputs.batch("visual", index, towers["visual"], rng)),
                                            dim=-1)
            text = nn.functional.normalize(towers["text"](inputs.batch("text", index, towers["text"], rng)), dim=-1)
            loss = loss_fn(image, text, clip.logit_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    clip.eval()


def train_tower(modality: str, tower: nn.Module, inputs: TowerInputs, targets: torch.Tensor,
                train_idx: np.ndarray, val_idx: np.ndarray, num_classes: int, args, rng) -> dict:
    """One tower alone through its own linear head, epoch chosen on validation accuracy."""
    head = nn.Linear(tower.dim, num_classes).to(tower.device)
    targets = targets.to(tower.device)
    parameters = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.tower_lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()

    def train_epoch(_):
        order = torch.from_numpy(rng.permutation(train_idx))
        for i in range(0, len(order), args.tower_batch_size):
            index = order[i:i + args.tower_batch_size]
            loss = loss_fn(head(tower(inputs.batch(modality, index, tower, rng))), targets[index.to(tower.device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def validate():
        index = torch.from_numpy(val_idx)
        outputs = torch.cat([head(tower(inputs.batch(modality, index[i:i + 256], tower, None)))
                             for i in range(0, len(index), 256)])
        return float((outputs.argmax(dim=1) == targets[index.to(tower.device)]).float().mean())

    best, epoch = fit([tower, head], args.tower_epochs, train_epoch, validate, f"stage 1: {modality} tower")
    return {"validation_acc": round(best, 4), "epoch": epoch}


def label_indices(rows: list[MediaRow], names: list[str], path) -> np.ndarray:
    unknown = sorted({r.label for r in rows} - set(names))
    if unknown:
        raise DataError(f"{path}: labels {', '.join(unknown)} are not among the bundle's ({', '.join(names)})")
    return np.array([names.index(r.label) for r in rows], dtype=np.int64)


def manifest_sha256(path: Path, rows: list[MediaRow]) -> str:
    """Digest of the manifest and every media file it names."""
    digest = hashlib.sha256(sha256_file(path).encode())
    for row in rows:
        for media in (row.image, row.audio):
            if media is not None:
                digest.update(sha256_file(media).encode())
    return digest.hexdigest()


def feature_set(path: Path, rows: list[MediaRow], features: dict[str, np.ndarray], labels: np.ndarray,
                label_names: list[str], sha256: str) -> FeatureSet:
    return FeatureSet(path, sha256, {m: x.astype(np.float32) for m, x in features.items()},
                      {m: MEDIA_KEYS[m] for m in features}, labels, None, np.array([r.uid for r in rows]),
                      label_names)


def train_media_features(args: argparse.Namespace, split, device: torch.device) -> tuple[FeatureSet, dict, dict]:
    """Stage 1 for raw media: trains the towers on `device`; returns their features, the bundle's media spec,
    weights."""
    path = Path(args.data)
    rows = read_manifest(path)
    modalities = manifest_modalities(rows)
    if not modalities:
        raise DataError(f"{path}: no modality (image, text, audio) is present in every row")
    names = sorted({r.label for r in rows})
    labels = label_indices(rows, names, path)
    videos = np.array([r.uid.rsplit("_", 1)[0] for r in rows])
    train_idx, val_idx = split(videos)
    spec, checkpoint = media_spec(args, modalities)
    towers, clip = build_towers(spec, modalities, checkpoint)
    for tower in towers.values():
        tower.to(device)
    inputs = TowerInputs(rows, towers)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    targets = torch.from_numpy(labels)
    info = {}
    if {"visual", "text"} <= set(towers) and args.contrastive_epochs:
        contrastive_stage(towers, inputs, train_idx, args.contrastive_epochs, args, rng)
    for modality, tower in towers.items():
        info[modality] = train_tower(modality, tower, inputs, targets, train_idx, val_idx, len(names), args, rng)
    spec["training"] = info
    features = {m: inputs.features(m, tower) for m, tower in towers.items()}
    weights = {}
    if clip is not None:
        weights["clip"] = clip.state_dict()
    if "audio" in towers:
        weights["tower_audio"] = towers["audio"].state_dict()
    return feature_set(path, rows, features, labels, names, manifest_sha256(path, rows)), spec, weights


def bundle_media_features(path: str | Path, bundle: Bundle) -> FeatureSet:
    """A manifest embedded with a bundle's towers (for mmfuse-eval on data it has never seen)."""
    path = Path(path)
    rows = read_manifest(path)
    if not bundle.manifest.get("media"):
        raise DataError(f"bundle {bundle.id} was trained on feature files, not raw media; evaluate it on an npz")
    present = manifest_modalities(rows)
    towers = bundle.towers([m for m in bundle.modality_order if m in present])
    if not towers:
        raise DataError(f"{path} has none of the bundle's modalities ({', '.join(bundle.modality_order)})")
    inputs = TowerInputs(rows, towers)
    features = {m: inputs.features(m, tower) for m, tower in towers.items()}
    labels = label_indices(rows, bundle.labels, path)
    return feature_set(path, rows, features, labels, bundle.labels, manifest_sha256(path, rows))


SYNTHETIC_WORDS = {"negative": ["awful", "sad", "terrible", "angry", "hate"],
                   "neutral": ["table", "report", "monday", "average", "okay"],
                   "positive": ["great", "happy", "love", "wonderful", "fun"]}
FILLER = ["the", "a", "today", "we", "this", "is", "it", "so", "really", "and"]


def make_synthetic_media(folder: str | Path, sessions: int = 12, per_session: int = 6, seed: int = 0) -> Path:
    """Write a generated media set: JPEG images, texts, 16 kHz WAV audio and a JSONL manifest.

    The label (negative, neutral, positive) shows as the dominant colour of the image,
    words of the text and the pitch of a tone, each under noise. For tests and the
    raw-media demo where no real recordings of all three modalities exist.
    """
    from PIL import Image

    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(SYNTHETIC_WORDS)
    rate = 16000
    lines = []
    for s in range(sessions):
        for turn in range(per_session):
            label = names[rng.integers(3)]
            k = names.index(label)
            image = rng.integers(0, 90, size=(48, 48, 3))
            image[8:40, 8:40, k] += 150
            name = f"s{s:02d}_{turn}"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "media" / f"{name}.jpg", quality=85)
            words = list(rng.choice(FILLER, 4)) + list(rng.choice(SYNTHETIC_WORDS[label], 2))
            rng.shuffle(words)
            t = np.arange(int(1.5 * rate)) / rate
            tone = 0.3 * np.sin(2 * np.pi * (250 * 2 ** k) * t) + 0.05 * rng.normal(size=len(t))
            with wave.open(str(folder / "media" / f"{name}.wav"), "wb") as handle:
                handle.setnchannels(1)
                handle.setsampwidth(2)
                handle.setframerate(rate)
                handle.writeframes((np.clip(tone, -1, 1) * 32767).astype("<i2").tobytes())
            lines.append(json.dumps({"id": name, "session": f"s{s:02d}", "turn": turn, "image": f"media/{name}.jpg",
                                     "text": " ".join(words), "audio": f"media/{name}.wav", "label": label}))
    manifest = folder / "labels.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def with_generated_audio(manifest: str | Path, folder: str | Path, rows: int, seed: int = 0) -> Path:
    """A copy of the first `rows` rows of a manifest, each with a generated 2 s WAV as its `audio`.

    The audio is synthetic babble (random formant-like tones under noise), NOT speech,
    and carries nothing about the label: it lets a demo exercise a live microphone
    path on data sets that have none.
    """
    source = Path(manifest)
    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rate, lines = 16000, []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines()[:rows]):
        record = json.loads(line)
        if record.get("image"):
            record["image"] = str((source.parent / record["image"]).resolve())
        t = np.arange(2 * rate) / rate
        tones = sum(np.sin(2 * np.pi * rng.uniform(150, 900) * t + rng.uniform(0, 6)) for _ in range(3))
        envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t), 0, None)
        wave_ = 0.1 * tones * envelope + 0.02 * rng.normal(size=len(t))
        path = folder / "audio" / f"{number}.wav"
        with wave.open(str(path), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(rate)
            handle.writeframes((np.clip(wave_, -1, 1) * 32767).astype("<i2").tobytes())
        record["audio"] = f"audio/{number}.wav"
        lines.append(json.dumps(record))
    out = folder / "labels.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out
