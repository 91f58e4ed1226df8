"""Splits of feature data sets, and a generated stand-in of the CMU-MOSI npz schema (mmfuse.datasets reads
the files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmfuse.datasets import DataError


def split_by_video(videos: np.ndarray, val_fraction: float, seed: int,
                   source: str = "the data") -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), whole videos on one side only. Raises DataError when a side would be
    empty: a file of one video has none to validate on that it was not trained on."""
    unique = np.unique(videos)
    if len(unique) < 2:
        raise DataError(f"{source} holds {len(unique)} video(s) (a row's video is its uid up to the last '_'), and "
                        f"a validation split takes whole videos, so nothing would be left to train on; give data of "
                        f"two videos at least (beside a features npz, a --val file also does)")
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    n_val = min(max(1, round(len(unique) * val_fraction)), len(unique) - 1)
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
