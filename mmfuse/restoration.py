"""The restorer stage's core: the bundle's frozen per-modality encoders over a batch of
closed windows, and the configured restorer filling the missing embeddings. No I/O."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from mmfuse.bundle import Bundle
from mmfuse.frames import ClosedWindow
from mmfuse.inference import embed
from mmfuse.restorers import DiffusionRestorer, SteppingAside


class WindowEncoder:
    """The bundle's frozen stage-1 encoders over a batch of windows. No I/O."""

    def __init__(self, bundle: Bundle):
        self.encoders = bundle.encoders()
        self.order = bundle.modality_order
        self.embed_dim = bundle.manifest["embed_dim"]

    def encode(self, windows: list[ClosedWindow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, M, E] and presence [B, M]; modalities absent from a window stay zero."""
        z = torch.zeros(len(windows), len(self.order), self.embed_dim)
        present = torch.zeros(len(windows), len(self.order), dtype=torch.bool)
        for i, modality in enumerate(self.order):
            rows = [b for b, w in enumerate(windows) if modality in w.features]
            if rows:
                features = {modality: torch.from_numpy(np.stack([windows[b].features[modality] for b in rows]))}
                z[rows, i] = embed(self.encoders, features, [modality], len(rows), self.embed_dim)[0][:, 0]
                present[rows, i] = True
        return z, present


def window_seed(window: ClosedWindow) -> int:
    """Noise seed of a window: the same on every run, whatever batch the window lands in."""
    return zlib.crc32(f"{window.session}/{window.window_id}".encode())


class WindowRestorer:
    """Encode + restore a batch of incomplete windows. No I/O."""

    def __init__(self, bundle: Bundle, method: str, overrides: dict | None = None,
                 abstain_spread: float | None = None, device: str = "cpu"):
        self.encoder = WindowEncoder(bundle)
        self.restorer = bundle.restorer(method, **(overrides or {}))
        self.method = method
        self.abstain_spread = abstain_spread
        self.device = device
        core = self.restorer.restorer if isinstance(self.restorer, SteppingAside) else self.restorer
        if isinstance(core, DiffusionRestorer):
            core.model.to(device)

    def restore(self, windows: list[ClosedWindow]) -> list[ClosedWindow]:
        z, present = self.encoder.encode(windows)
        with torch.no_grad():
            restoration = self.restorer.restore(z, present, seeds=[window_seed(w) for w in windows])
        filled = restoration.filled.numpy()
        spread = None if restoration.spread is None else restoration.spread.tolist()
        aside = [False] * len(windows) if restoration.aside is None else restoration.aside.tolist()
        for i, window in enumerate(windows):
            window.embeddings = filled[i]
            window.restored = [m for m in window.missing if m in self.encoder.order]
            window.restorer = "zero" if aside[i] else self.method
            window.stepped_aside = aside[i]
            if spread is not None and not aside[i]:
                window.spread = round(spread[i], 5)
                window.abstain = self.abstain_spread is not None and spread[i] > self.abstain_spread
        return windows

    def zero_filled(self, windows: list[ClosedWindow]) -> list[ClosedWindow]:
        """The fallback when restoring failed: missing modalities left at zero (the `zero` restorer), marked so
        downstream can tell; a window still gets its decision."""
        try:
            z = self.encoder.encode(windows)[0].numpy()
        except Exception:
            z = np.zeros((len(windows), len(self.encoder.order), self.encoder.embed_dim), np.float32)
        for window, row in zip(windows, z):
            window.embeddings = row
            window.restored = [m for m in window.missing if m in self.encoder.order]
            window.restorer = "zero"
            window.restoration_failed = True
        return windows
