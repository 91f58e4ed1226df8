"""The data sets both sides read: feature files (the CMU-MOSI npz schema) and raw-media
manifests (JSONL: one row per sample, media paths relative to the manifest's folder).

A manifest has one JSON object per line: `id` (or `utterance_id`), `label`, and any of
`image` (a path relative to the manifest's folder), `text`, `audio` (a 16-bit PCM WAV
path); optionally `dialogue_id` or `session` with `turn`, which make rows a session in
order (the MVSA and IEMOCAP files in ../shared/data follow this format).
"""

from __future__ import annotations

import json
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse import MODALITIES
from mmfuse.media import MediaError, rgb_image

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
        raise DataError(f"{path}: {'a directory, not an npz file' if path.is_dir() else 'no such file'}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    try:
        return _feature_set(path, archive)
    except (ValueError, TypeError, OSError) as exc:  # an array of objects (pickled), or of values of no number
        raise DataError(f"{path}: an array cannot be read as the schema needs ({exc}); save numbers, and uid as "
                        f"strings, with numpy.savez") from None


def _feature_set(path: Path, archive) -> FeatureSet:
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
        raw_label = np.asarray(archive["label"])
        uid = np.asarray(archive["uid"]).astype(str)
        sentiment = np.asarray(archive["sentiment"], dtype=np.float32) if "sentiment" in names else None
    if raw_label.ndim != 1:
        raise DataError(f"{path}: label has shape {raw_label.shape}; expected one class index per row")
    label = raw_label.astype(np.int64)
    if raw_label.dtype.kind == "f" and not np.array_equal(raw_label, label):
        example = raw_label[raw_label != label][0]
        raise DataError(f"{path}: label holds values that are not whole numbers (e.g. {example:g}); labels are "
                        f"class indices 0..K-1 (a continuous target goes in sentiment)")
    for name, column in (("uid", uid), ("sentiment", sentiment)):
        if column is not None and column.shape != label.shape:
            raise DataError(f"{path}: {name} has shape {column.shape}; expected one value per row ({len(label)})")
    if sentiment is not None and not np.isfinite(sentiment).all():
        raise DataError(f"{path}: sentiment contains NaN or infinite values")
    for modality, matrix in features.items():
        if matrix.ndim != 2 or len(matrix) != len(label):
            raise DataError(f"{path}: {keys[modality]} has shape {matrix.shape}; expected [{len(label)}, dim]")
        if not np.isfinite(matrix).all():
            raise DataError(f"{path}: {keys[modality]} contains NaN or infinite values")
    if not len(label):
        raise DataError(f"{path}: holds no rows")
    if label.min() < 0:
        raise DataError(f"{path}: labels must be class indices 0..K-1")
    from mmfuse.bundle import sha256_file  # (mmfuse.bundle imports torch: not for a command's --help)

    return FeatureSet(path, sha256_file(path), features, keys, label, sentiment, uid)


MEDIA_KEYS = {"visual": "image", "text": "text", "audio": "audio"}


@dataclass
class MediaRow:
    uid: str             # <session>_<turn>, as in the npz schema
    label: str
    image: Path | None
    text: str | None
    audio: Path | None


def read_manifest(path: str | Path) -> list[MediaRow]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a JSON {type(record).__name__}, not an object")
        ident = record.get("id", record.get("utterance_id"))
        if ident is None or not isinstance(record.get("label"), (str, int)) or isinstance(record["label"], bool):
            raise DataError(f"{path}:{number}: every row needs `id` (or `utterance_id`) and a `label` (a name or "
                            f"a number)")
        session = record.get("dialogue_id", record.get("session"))
        uid = f"{session}_{record.get('turn', number)}" if session is not None else f"{ident}_0"
        image = path.parent / record["image"] if record.get("image") else None
        audio = path.parent / record["audio"] if record.get("audio") else None
        text = record.get("text")
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}:{number}: `text` must be a string")
        rows.append(MediaRow(uid, str(record["label"]), image, text, audio))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def manifest_modalities(rows: list[MediaRow]) -> list[str]:
    """Modalities every row of the manifest has."""
    present = {"visual": all(r.image for r in rows), "text": all(r.text is not None for r in rows),
               "audio": all(r.audio for r in rows)}
    return [m for m in MODALITIES if present[m]]


def read_wav(path: Path, rate: int) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as handle:
            if handle.getsampwidth() != 2:
                raise DataError(f"{path}: only 16-bit PCM WAV is read")
            frames = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
            channels, source_rate = handle.getnchannels(), handle.getframerate()
    except (wave.Error, EOFError, FileNotFoundError) as exc:
        raise DataError(f"{path}: not a readable WAV file ({exc})") from None
    samples = frames.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    if source_rate != rate:
        n = max(1, round(len(samples) * rate / source_rate))
        samples = np.interp(np.arange(n) * source_rate / rate, np.arange(len(samples)), samples)
    return samples.astype(np.float32)


def read_image(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            return rgb_image(handle)
    except (MediaError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
