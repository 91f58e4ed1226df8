"""Feature data sets (the CMU-MOSI npz schema) and a generated stand-in of the same schema."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse.bundle import sha256_file

# npz key(s) that hold each modality's matrix, in order of preference
MODALITY_KEYS = {"audio": ("audio",), "visual": ("video", "visual"), "text": ("text",)}
DEFAULT_DATA_DIR = Path("../shared/data")


class DataError(Exception):
    """A data file that cannot be used; the message says what is wrong with it."""


def data_dir() -> Path:
    """Where the shared real data lives: $MMFUSE_DATA, else ../shared/data."""
    return Path(os.environ.get("MMFUSE_DATA", DEFAULT_DATA_DIR))


@dataclass
class FeatureSet:
    path: Path
    sha256: str
    features: dict[str, np.ndarray]   # modality -> float32 [N, dim]
    keys: dict[str, str]              # modality -> npz key it came from
    label: np.ndarray                 # int64 [N]
    sentiment: np.ndarray | None      # float32 [N]
    uid: np.ndarray                   # str [N]
    label_names: list[str] | None = None  # class names when the source names them (media manifests)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def videos(self) -> np.ndarray:
        """The video (session) of each row: the part of `uid` before the last '_'."""
        return np.array([u.rsplit("_", 1)[0] for u in self.uid])

    def previous_rows(self, k: int) -> np.ndarray:
        """[N, k] indices of each row's k preceding utterances in its video (nearest first), -1 where none.

        Utterances are ordered by the number after the last '_' of `uid`.
        """
        result = np.full((len(self), k), -1, dtype=np.int64)
        if k == 0:
            return result
        by_video: dict[str, list[tuple[int, int]]] = {}
        for row, uid in enumerate(self.uid):
            video, _, number = uid.rpartition("_")
            by_video.setdefault(video, []).append((int(number) if number.isdigit() else row, row))
        for rows in by_video.values():
            ordered = [row for _, row in sorted(rows)]
            for position, row in enumerate(ordered):
                before = ordered[max(0, position - k):position][::-1]
                result[row, :len(before)] = before
        return result

    def rows(self, index: np.ndarray) -> "FeatureSet":
        return FeatureSet(self.path, self.sha256, {m: x[index] for m, x in self.features.items()}, self.keys,
                          self.label[index], None if self.sentiment is None else self.sentiment[index],
                          self.uid[index], self.label_names)


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    with archive:
        names = set(archive.files)
        features, keys = {}, {}
        for modality, candidates in MODALITY_KEYS.items():
            key = next((k for k in candidates if k in names), None)
            if key is not None:
                features[modality] = np.asarray(archive[key], dtype=np.float32)
                keys[modality] = key
        for required in ("label", "uid"):
            if required not in names:
                raise DataError(f"{path}: key {required!r} missing; the schema needs label, uid and at least "
                                f"one of audio, video/visual, text")
        if not features:
            raise DataError(f"{path}: none of the modality keys audio, video, visual, text is present")
        label = np.asarray(archive["label"]).astype(np.int64)
        uid = np.asarray(archive["uid"]).astype(str)
        sentiment = np.asarray(archive["sentiment"], dtype=np.float32) if "sentiment" in names else None
    for modality, matrix in features.items():
        if matrix.ndim != 2 or len(matrix) != len(label):
            raise DataError(f"{path}: {keys[modality]} has shape {matrix.shape}; expected [{len(label)}, dim]")
        if not np.isfinite(matrix).all():
            raise DataError(f"{path}: {keys[modality]} contains NaN or infinite values")
    if label.min() < 0:
        raise DataError(f"{path}: labels must be class indices 0..K-1")
    return FeatureSet(path, sha256_file(path), features, keys, label, sentiment, uid)


def split_by_video(videos: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), whole videos on one side only."""
    unique = np.unique(videos)
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    n_val = max(1, round(len(unique) * val_fraction))
    val_videos = set(unique[:n_val])
    is_val = np.array([v in val_videos for v in videos])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def make_synthetic(path: str | Path, videos: int = 40, per_video: int = 16, seed: int = 0,
                   dims: dict[str, int] | None = None) -> Path:
    """Write a generated feature set with the MOSI schema (audio 73, video 100, text 100; `dims` overrides).

    Each modality is a noisy linear view of a shared latent whose first axis carries
    the label, text the clearest view: a missing modality is partly predictable
    from the others, as in real recordings.
    """
    rng = np.random.default_rng(seed)
    n = videos * per_video
    sentiment = np.clip(rng.normal(0, 1.5, n) + np.repeat(rng.normal(0, 0.7, videos), per_video), -3, 3)
    latent = np.column_stack([sentiment / 1.5, rng.normal(size=(n, 7))])
    arrays = {}
    sizes = {"audio": 73, "video": 100, "text": 100, **(dims or {})}
    for key, noise in (("audio", 2.0), ("video", 2.5), ("text", 0.8)):
        dim = sizes[key]
        mixing = rng.normal(size=(8, dim))
        arrays[key] = (latent @ mixing + noise * rng.normal(size=(n, dim))).astype(np.float32)
    uid = np.array([f"synthetic{v:03d}_{i}" for v in range(videos) for i in range(per_video)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, uid=uid, transcript=np.array([""] * n), label=(sentiment >= 0).astype(np.int64),
             sentiment=sentiment.astype(np.float32), **arrays)
    return path
