"""Restorer actor: encodes incomplete windows, fills their missing modality embeddings
with the configured restorer in dynamic batches across sessions, and hands each batch
to the fusion actor."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import structlog
import torch

from mmfuse.bundle import Bundle, load_bundle
from mmfuse.frames import ClosedWindow
from mmfuse.inference import embed
from mmfuse.logs import configure
from mmfuse.restorers import DiffusionRestorer


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
                features = {modality: torch.stack([torch.from_numpy(windows[b].features[modality]) for b in rows])}
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
        if isinstance(self.restorer, DiffusionRestorer):
            self.restorer.model.to(device)

    def restore(self, windows: list[ClosedWindow]) -> list[ClosedWindow]:
        z, present = self.encoder.encode(windows)
        with torch.no_grad():
            if isinstance(self.restorer, DiffusionRestorer):
                filled = self.restorer.restore(z, present, seeds=[window_seed(w) for w in windows]).numpy()
                spread = self.restorer.last_spread.tolist() if self.restorer.samples > 1 else None
            else:
                filled, spread = self.restorer.restore(z, present).numpy(), None
        for i, window in enumerate(windows):
            window.embeddings = filled[i]
            window.restored = [m for m in window.missing if m in self.encoder.order]
            window.restorer = self.method
            if spread is not None:
                window.extra["restoration_spread"] = round(spread[i], 5)
                if self.abstain_spread is not None and spread[i] > self.abstain_spread:
                    window.extra["abstain"] = True
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
            window.extra["restoration_failed"] = True
        return windows


class RestorerActor:
    """restore() only queues; a worker thread restores up to max_batch windows at a time, waiting at
    most max_wait_ms for a batch to fill, so sessions closing windows together share one pass."""

    def __init__(self, bundle_path: str, restorer: dict, fusion, log_format: dict):
        from mmfuse.actors import limit_threads

        limit_threads()
        configure(**log_format)
        self.log = structlog.get_logger().bind(actor="restorer")
        bundle = load_bundle(bundle_path)
        device = "cuda" if restorer["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        self.restorer = WindowRestorer(bundle, restorer["method"], restorer["overrides"], restorer["abstain_spread"],
                                       device)
        self.max_batch, self.max_wait = restorer["max_batch"], restorer["max_wait_ms"] / 1000
        self.fusion = fusion
        self.queue: list[tuple[float, ClosedWindow]] = []
        self.condition = threading.Condition()
        self.busy = False
        self.stopping = False
        self.in_flight: list = []
        self.windows = 0
        self.batches = 0
        self.failed = 0
        threading.Thread(target=self._work, name="restorer", daemon=True).start()
        self.log.info("restorer ready", method=restorer["method"], bundle=bundle.id, device=device)

    def ready(self) -> None:
        return None

    def restore(self, windows: list[ClosedWindow]) -> None:
        with self.condition:
            now = time.monotonic()
            self.queue.extend((now, w) for w in windows)
            self.condition.notify()

    def _work(self) -> None:
        import ray

        while True:
            with self.condition:
                while not self.queue and not self.stopping:
                    self.condition.wait()
                if not self.queue:
                    return
                deadline = self.queue[0][0] + self.max_wait
                while len(self.queue) < self.max_batch and not self.stopping and time.monotonic() < deadline:
                    self.condition.wait(deadline - time.monotonic())
                batch = [w for _, w in self.queue[:self.max_batch]]
                del self.queue[:self.max_batch]
                self.busy = True
            try:
                windows = self.restorer.restore(batch)
            except Exception as exc:  # a lost window would hold back its session's decisions for good
                self.log.exception("restoration failed; the windows are decided zero-filled", windows=len(batch),
                                   error=repr(exc))
                windows = self.restorer.zero_filled(batch)
                self.failed += len(batch)
            self.in_flight.append(self.fusion.decide.remote(windows))
            if len(self.in_flight) > 64:
                _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)
            with self.condition:
                self.windows += len(windows)
                self.batches += 1
                self.busy = False
                self.condition.notify_all()

    def drain(self) -> dict:
        import ray

        with self.condition:
            self.stopping = True
            self.condition.notify_all()
            while self.queue or self.busy:
                self.condition.wait()
        ray.get(self.in_flight)
        self.in_flight = []
        return self.stats()

    def stats(self) -> dict:
        return {"windows": self.windows, "batches": self.batches, "failed": self.failed, "method": self.restorer.method}
