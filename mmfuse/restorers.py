"""Restorers fill the embeddings of missing modalities from the ones present.

All work in the frozen stage-1 embedding space on a batch: `z` is a float tensor
[B, M, E] (rows of missing modalities hold anything), `present` a bool tensor
[B, M] with at least one True per row. `restore` returns a new tensor in which
present rows are bit-identical to the input. Each restorer names the fusion head
it is paired with: `complete` (trained on complete data only) or its own
(trained on available + restored embeddings, stage 3).
"""

from __future__ import annotations

import torch

from mmfuse.models import CascadedResidualAutoencoder


def keep_present(z: torch.Tensor, present: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    return torch.where(present.unsqueeze(-1), z, filled)


class ZeroRestorer:
    """Missing embeddings become zeros, fed to a head that never saw a missing one."""
    name = "zero"
    head = "complete"

    def restore(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return keep_present(z, present, torch.zeros_like(z))

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
    def fit(cls, z_train: torch.Tensor) -> "MeanRestorer":
        return cls(z_train.mean(dim=0))

    def restore(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return keep_present(z, present, self.means.expand_as(z))

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

    @torch.no_grad()
    def restore(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return keep_present(z, present, self.model(z, present))

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "AutoencoderRestorer":
        model = CascadedResidualAutoencoder(**args)
        model.load_state_dict(state)
        return cls(model)


class RetrievalRestorer:
    """Average of the missing embeddings of the k training samples nearest in the present ones.

    Distance: mean over present modalities of the squared L2 distance, each
    modality scaled by its spread in the bank so no modality dominates.
    """
    name = "retrieval"
    head = "retrieval"

    def __init__(self, bank: torch.Tensor, k: int = 10):
        self.bank = bank  # [N, M, E]
        self.k = k
        self.scale = bank.var(dim=0).sum(dim=-1).clamp_min(1e-6)  # [M]

    @torch.no_grad()
    def restore(self, z: torch.Tensor, present: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """`exclude` [B, N] bool hides bank rows from a query (same video, while training)."""
        distance = torch.zeros(len(z), len(self.bank), device=z.device)
        for m in range(z.shape[1]):
            d = torch.cdist(z[:, m], self.bank[:, m]).square() / self.scale[m]
            distance += d * present[:, m:m + 1]
        distance /= present.sum(dim=1, keepdim=True)
        if exclude is not None:
            distance = distance.masked_fill(exclude, float("inf"))
        nearest = distance.topk(min(self.k, len(self.bank)), dim=1, largest=False).indices  # [B, k]
        return keep_present(z, present, self.bank[nearest].mean(dim=1))

    def state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "RetrievalRestorer":
        return cls(state["bank"], **args)




class DiffusionRestorer:
    """Conditional diffusion in the embedding space (mmfuse.diffusion), K samples averaged.

    With K > 1 the spread of the samples (mean standard deviation over the missing
    tokens) is left in `last_spread`. Noise comes from one generator per row seeded
    by the caller, so a window restores the same whatever batch it is in.
    """
    name = "diffusion"
    head = "diffusion"

    def __init__(self, model, prior: torch.Tensor, steps: int = 10, mode: str = "ddim", admc_start: int = 50,
                 samples: int = 1, seed: int = 0, clip: float | None = 5.0):
        from mmfuse.diffusion import DiffusionSampler

        self.model = model.eval()
        self.prior = prior  # [M, E] training mean, ADMC's starting guess
        self.sampler = DiffusionSampler(model, steps, mode, admc_start, clip=clip)
        self.samples = samples
        self.seed = seed
        self.last_spread = torch.zeros(0)

    def noise(self, rows: int, shape: tuple, seeds: list[int] | None) -> torch.Tensor:
        draws = len(self.sampler.timesteps()) + 1
        noise = torch.empty(self.samples, draws, rows, *shape)
        for i in range(rows):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (seeds[i] if seeds else i))
            noise[:, :, i] = torch.randn(self.samples, draws, *shape, generator=generator)
        return noise

    @torch.no_grad()
    def restore(self, z: torch.Tensor, present: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        rows, k = len(z), self.samples
        noise = self.noise(rows, tuple(z.shape[1:]), seeds)                    # [K, draws, B, M, E]
        noise = noise.transpose(0, 1).reshape(noise.shape[1], k * rows, *z.shape[1:])
        device = next(self.model.parameters()).device  # noise is drawn on the CPU: the same on every device
        draws = self.sampler.sample(z.repeat(k, 1, 1).to(device), present.repeat(k, 1).to(device),
                                    noise.to(device), self.prior.to(device)).to(z.device).view(k, rows, *z.shape[1:])
        missing = (~present).unsqueeze(-1).float()
        spread = (draws.std(dim=0, unbiased=False) * missing).sum(dim=(1, 2)) if k > 1 else \
            torch.zeros(rows, device=z.device)
        self.last_spread = spread / (missing.sum(dim=(1, 2)) * z.shape[-1]).clamp_min(1)
        return keep_present(z, present, draws.mean(dim=0))

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, "prior": self.prior}

    @classmethod
    def from_state(cls, state: dict, args: dict) -> "DiffusionRestorer":
        from mmfuse.diffusion import DiffusionDenoiser

        model = DiffusionDenoiser(**args["model"])
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        return cls(model, state["prior"], **{k: v for k, v in args.items() if k != "model"})


RESTORERS = {
    "zero": ZeroRestorer,
    "mean": MeanRestorer,
    "dropout": DropoutRestorer,
    "autoencoder": AutoencoderRestorer,
    "retrieval": RetrievalRestorer,
    "diffusion": DiffusionRestorer,
}
