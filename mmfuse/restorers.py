"""Restorers fill the embeddings of missing modalities from the ones present.

One protocol for all (`Restorer`), one registry (`RESTORERS`), from which mmfuse-train
fits them and bundles rebuild them. All work in the frozen stage-1 embedding space on
a batch: `z` is a float tensor [B, M, E] (rows of missing modalities hold anything),
`present` a bool tensor [B, M] with at least one True per row. `restore` returns a
`Restoration`: the filled embeddings, in which present rows are bit-identical to the
input, and the spread of the restorer's candidates where it has several. Each restorer
names the fusion head it is paired with: `complete` (trained on complete data only) or
its own (trained on available + restored embeddings, stage 3).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mmfuse.calibration import pattern_name
from mmfuse import fitting
from mmfuse.models import CascadedResidualAutoencoder


@dataclass
class Restoration:
    filled: torch.Tensor               # [B, M, E]
    spread: torch.Tensor | None = None  # [B] mean std of the candidates over the missing values; None: one answer
    aside: torch.Tensor | None = None   # [B] rows left to zero-fill and the complete-data head (SteppingAside)


@dataclass
class FitData:
    """What stage 2 of mmfuse-train fits a restorer from."""
    z_train: torch.Tensor                       # [N, M, E] training embeddings
    z_val: torch.Tensor                         # validation embeddings: a restorer's state is selected on them
    incomplete: torch.Tensor                    # [P, M] every incomplete presence pattern
    options: dict                               # mmfuse-train's arguments (lr, batch_size, neighbours, ...)
    draw: Callable[[torch.Tensor, int], torch.Tensor]  # n patterns drawn with the training's generator
    batches: Callable[[int], list[torch.Tensor]]       # shuffled index batches of n rows, likewise


class Restorer(Protocol):
    name: str
    head: str

    @classmethod
    def fit(cls, data: FitData) -> tuple["Restorer", dict]:
        """The fitted restorer and what the bundle keeps of its fitting: `args` (to rebuild it) and figures."""

    def restore(self, z: torch.Tensor, present: torch.Tensor, seeds: list[int] | None = None,
                exclude: torch.Tensor | None = None) -> Restoration:
        """`seeds` fix each row's random draws (the same window restores alike in any batch); `exclude` [B, N]
        hides training rows from a query (its own video, while training heads)."""

    def state(self) -> dict[str, torch.Tensor]: ...

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "Restorer": ...


def keep_present(z: torch.Tensor, present: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    return torch.where(present.unsqueeze(-1), z, filled)


def missing_spread(candidates: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B] mean standard deviation over K candidates [K, B, M, E] of the missing values of each row."""
    missing = (~present).unsqueeze(-1).to(candidates.dtype)
    spread = (candidates.std(dim=0, unbiased=False) * missing).sum(dim=(1, 2))
    return spread / (missing.sum(dim=(1, 2)) * candidates.shape[-1]).clamp_min(1)


class ZeroRestorer:
    """Missing embeddings become zeros, fed to a head that never saw a missing one."""
    name = "zero"
    head = "complete"

    @classmethod
    def fit(cls, data: FitData) -> tuple["ZeroRestorer", dict]:
        return cls(), {}

    def restore(self, z, present, seeds=None, exclude=None) -> Restoration:
        return Restoration(keep_present(z, present, torch.zeros_like(z)))

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "ZeroRestorer":
        return cls()


class DropoutRestorer(ZeroRestorer):
    """Zeros too, but fed to a head trained with modality dropout on zero-filled inputs."""
    name = "dropout"
    head = "dropout"


class MeanRestorer:
    """Missing embeddings become the training-set mean embedding of that modality."""
    name = "mean"
    head = "complete"

    def __init__(self, means: torch.Tensor):
        self.means = means  # [M, E]

    @classmethod
    def fit(cls, data: FitData) -> tuple["MeanRestorer", dict]:
        return cls(data.z_train.mean(dim=0)), {}

    def restore(self, z, present, seeds=None, exclude=None) -> Restoration:
        return Restoration(keep_present(z, present, self.means.expand_as(z)))

    def state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means}

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "MeanRestorer":
        return cls(state["means"])


class AutoencoderRestorer:
    """MMIN-style cascaded residual autoencoder imagines the missing embeddings."""
    name = "autoencoder"
    head = "autoencoder"

    def __init__(self, model: CascadedResidualAutoencoder):
        self.model = model.eval()

    @classmethod
    def fit(cls, data: FitData) -> tuple["AutoencoderRestorer", dict]:
        """Masked reconstruction error of the missing embeddings under random incomplete patterns; the state with
        the lowest error on the validation embeddings is kept."""
        num_modalities, embed_dim = data.z_train.shape[1:]
        model_args = {"num_modalities": num_modalities, "embed_dim": embed_dim}
        model = CascadedResidualAutoencoder(**model_args).to(data.z_train.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=data.options["lr"], weight_decay=1e-4)
        val_present = data.draw(data.incomplete, len(data.z_val))

        def masked_error(z, present):
            missing = (~present).unsqueeze(-1)
            return ((model(z, present) - z).square() * missing).sum() / (missing.sum() * z.shape[-1])

        def train_epoch(_):
            for batch in data.batches(len(data.z_train)):
                present = data.draw(data.incomplete, len(batch))
                loss = masked_error(data.z_train[batch], present)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        best, epoch = fitting.fit([model], data.options["restorer_epochs"], train_epoch,
                          lambda: -float(masked_error(data.z_val, val_present)), "stage 2: autoencoder")
        return cls(model), {"args": model_args, "validation_mse": round(-best, 5), "epoch": epoch}

    @torch.no_grad()
    def restore(self, z, present, seeds=None, exclude=None) -> Restoration:
        return Restoration(keep_present(z, present, self.model(z, present)))

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "AutoencoderRestorer":
        model = CascadedResidualAutoencoder(**args)
        model.load_state_dict(state)
        return cls(model)


class RetrievalRestorer:
    """Average of the missing embeddings of the k training samples nearest in the present ones; their spread is
    the restoration's.

    Distance: mean over present modalities of the squared L2 distance, each
    modality scaled by its spread in the bank so no modality dominates.
    """
    name = "retrieval"
    head = "retrieval"

    def __init__(self, bank: torch.Tensor, k: int = 10):
        self.bank = bank  # [N, M, E]
        self.k = k
        self.scale = bank.var(dim=0).sum(dim=-1).clamp_min(1e-6)  # [M]

    @classmethod
    def fit(cls, data: FitData) -> tuple["RetrievalRestorer", dict]:
        k = data.options["neighbours"]
        return cls(data.z_train, k=k), {"args": {"k": k}}

    @torch.no_grad()
    def restore(self, z, present, seeds=None, exclude=None) -> Restoration:
        distance = torch.zeros(len(z), len(self.bank), device=z.device)
        for m in range(z.shape[1]):
            d = torch.cdist(z[:, m], self.bank[:, m]).square() / self.scale[m]
            distance += d * present[:, m:m + 1]
        distance /= present.sum(dim=1, keepdim=True)
        if exclude is not None:
            distance = distance.masked_fill(exclude, float("inf"))
        nearest = distance.topk(min(self.k, len(self.bank)), dim=1, largest=False).indices  # [B, k]
        neighbours = self.bank[nearest]                                                   # [B, k, M, E]
        return Restoration(keep_present(z, present, neighbours.mean(dim=1)),
                           missing_spread(neighbours.transpose(0, 1), present))

    def state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "RetrievalRestorer":
        return cls(state["bank"], **args)


class DiffusionRestorer:
    """Conditional diffusion in the embedding space (mmfuse.diffusion), K samples averaged.

    With K > 1 the spread of the samples is the restoration's. Noise comes from one generator per row seeded
    by the caller, so a window restores the same whatever batch it is in.
    """
    name = "diffusion"
    head = "diffusion"

    def __init__(self, model, prior: torch.Tensor, steps: int = 10, mode: str = "ddim", admc_start: int = 50,
                 samples: int = 1, seed: int = 0, clip: float | None = 5.0):
        from mmfuse.diffusion import SAMPLERS, GaussianDiffusion

        if mode not in SAMPLERS:
            raise ValueError(f"mode must be one of {', '.join(SAMPLERS)}, got {mode!r}")
        self.model = model.eval()
        self.prior = prior  # [M, E] training mean, ADMC's starting guess
        self.diffusion = GaussianDiffusion(clip=clip)
        self.steps, self.mode, self.admc_start = steps, mode, admc_start
        self.samples = samples
        self.seed = seed

    @classmethod
    def fit(cls, data: FitData) -> tuple["DiffusionRestorer", dict]:
        """L_base, then L_base + L_mutual (mmfuse.diffusion_training); the state restoring the validation
        embeddings under random incomplete patterns best is kept."""
        from mmfuse.diffusion import DiffusionDenoiser
        from mmfuse.diffusion_training import train_diffusion

        o = data.options
        num_modalities, embed_dim = data.z_train.shape[1:]
        model_args = {"num_modalities": num_modalities, "embed_dim": embed_dim, "width": o["diffusion_width"],
                      "depth": o["diffusion_depth"], "conditioning": o["diffusion_conditioning"]}
        model = DiffusionDenoiser(**model_args).to(data.z_train.device)
        sampler_args = {"steps": o["diffusion_steps"], "mode": o["diffusion_mode"]}
        restorer = cls(model, data.z_train.mean(dim=0), **sampler_args)
        z_val = data.z_val
        val_present = data.incomplete[torch.from_numpy(np.random.default_rng(o["seed"]).integers(
            len(data.incomplete), size=len(z_val))).to(z_val.device)]

        def validate():
            missing = (~val_present).unsqueeze(-1)
            error = (restorer.restore(z_val, val_present).filled - z_val).square() * missing
            return -float(error.sum() / (missing.sum() * z_val.shape[-1]))

        def progress(epochs):
            return tqdm(epochs, desc="stage 2: diffusion", unit="epoch", file=sys.stderr, leave=False)

        best, epoch = train_diffusion(model, data.z_train, o["diffusion_epochs"], o["mutual_epochs"],
                                      o["batch_size"] * 2, o["lr"], o["seed"], validate, progress)
        restorer.model.eval()
        return restorer, {"args": {"model": model_args, **sampler_args}, "validation_mse": round(-best, 5),
                          "epoch": epoch}

    def noise(self, rows: int, shape: tuple, seeds: list[int] | None) -> torch.Tensor:
        draws = len(self.diffusion.timesteps(self.steps, self.mode, self.admc_start)) + 1
        noise = torch.empty(self.samples, draws, rows, *shape)
        for i in range(rows):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (seeds[i] if seeds else i))
            noise[:, :, i] = torch.randn(self.samples, draws, *shape, generator=generator)
        return noise

    @torch.no_grad()
    def restore(self, z, present, seeds=None, exclude=None) -> Restoration:
        rows, k = len(z), self.samples
        noise = self.noise(rows, tuple(z.shape[1:]), seeds)                    # [K, draws, B, M, E]
        noise = noise.transpose(0, 1).reshape(noise.shape[1], k * rows, *z.shape[1:])
        device = next(self.model.parameters()).device  # noise is drawn on the CPU: the same on every device
        draws = self.diffusion.sample(self.model, z.repeat(k, 1, 1).to(device), present.repeat(k, 1).to(device),
                                      noise.to(device), self.prior.to(device), self.steps, self.mode,
                                      self.admc_start).to(z.device).view(k, rows, *z.shape[1:])
        return Restoration(keep_present(z, present, draws.mean(dim=0)),
                           missing_spread(draws, present) if k > 1 else None)

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, "prior": self.prior}

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "DiffusionRestorer":
        from mmfuse.diffusion import DiffusionDenoiser

        model = DiffusionDenoiser(**args["model"])
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        return cls(model, state["prior"], **{k: v for k, v in args.items() if k != "model"})


class SteppingAside:
    """A restorer that steps aside where it restored worse than zero-fill on the validation data: windows of
    those presence patterns (named as mmfuse.calibration.pattern_name does) are zero-filled, with no spread,
    and marked `aside`, so that the complete-data head judges them, exactly as the `zero` restorer would. Only
    the other windows are restored; anything else is the wrapped restorer's (`model`, `samples`, ...)."""

    def __init__(self, restorer: Restorer, patterns: list[str], order: list[str]):
        self.restorer, self.patterns, self.order = restorer, set(patterns), order

    def __getattr__(self, name: str):
        return getattr(self.__dict__["restorer"], name)

    def restore(self, z, present, seeds=None, exclude=None) -> Restoration:
        aside = torch.tensor([pattern_name(row, self.order) in self.patterns for row in present.tolist()],
                             dtype=torch.bool, device=z.device)
        filled = keep_present(z, present, torch.zeros_like(z))
        spread = None
        kept = torch.nonzero(~aside).squeeze(1)
        if len(kept):
            rows = kept.tolist()  # without seeds a row's draws follow its index: keep the index it had
            restoration = self.restorer.restore(z[kept], present[kept], rows if seeds is None else
                                                [seeds[i] for i in rows], None if exclude is None else exclude[kept])
            filled[kept] = restoration.filled
            if restoration.spread is not None:
                spread = torch.zeros(len(z), device=z.device, dtype=restoration.spread.dtype)
                spread[kept] = restoration.spread
        return Restoration(filled, spread, aside)

    def state(self) -> dict[str, torch.Tensor]:
        return self.restorer.state()


RESTORERS: dict[str, type[Restorer]] = {
    "zero": ZeroRestorer,
    "mean": MeanRestorer,
    "dropout": DropoutRestorer,
    "autoencoder": AutoencoderRestorer,
    "retrieval": RetrievalRestorer,
    "diffusion": DiffusionRestorer,
}
