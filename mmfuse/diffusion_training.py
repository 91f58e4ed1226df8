"""Training the diffusion restorer: L_base, then L_base + L_mutual (cross-modal mutual learning)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mmfuse.diffusion import T_STEPS, DiffusionDenoiser, GaussianDiffusion, linear_alpha_bar

MUTUAL_TAU = 50          # mutual learning acts on steps t < tau
UNCONDITIONAL_SHARE = 0.15  # rows trained with nothing present: the joint prior ADMC inpainting samples from


def base_loss(model: DiffusionDenoiser, diffusion: GaussianDiffusion, z: torch.Tensor, present: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """L_base = E || eps - eps_theta(x_t, c, t) ||^2 over the missing tokens."""
    t = torch.randint(0, T_STEPS, (len(z),), generator=generator).to(z.device)
    eps = torch.randn(z.shape, generator=generator).to(z.device)
    predicted = model(diffusion.noised(z, t, eps), t, z, present)
    missing = (~present).unsqueeze(-1).float()
    return ((eps - predicted).square() * missing).sum() / (missing.sum() * z.shape[-1])


def mutual_loss(model: DiffusionDenoiser, diffusion: GaussianDiffusion, z: torch.Tensor, present: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """L_mutual: at t < tau, x0_hat of a restored modality conditions the restoration of a known one.

    x0_hat = (x_t - sqrt(1 - a_t) eps_theta(x_t, c, t)) / sqrt(a_t) with the cumulative a_t; the known
    modality is then hidden and must be restored from c' = (c without it) + x0_hat, matching its own
    fresh noise. Rows with nothing present have no known modality to check and are skipped.
    """
    rows = torch.nonzero(present.any(dim=1) & (~present).any(dim=1)).squeeze(1)
    if not len(rows):
        return z.new_zeros(())
    z, present = z[rows], present[rows]
    t = torch.randint(0, MUTUAL_TAU, (len(z),), generator=generator).to(z.device)
    eps = torch.randn(z.shape, generator=generator).to(z.device)
    x_t = diffusion.noised(z, t, eps)
    x0_hat = diffusion.x0_estimate(x_t, model(x_t, t, z, present), t)
    restored = _pick(~present, generator)   # [B] one missing modality per row
    known = _pick(present, generator)       # [B] one present modality per row
    index = torch.arange(len(z), device=z.device)
    condition = z.clone()
    condition[index, restored] = x0_hat[index, restored]
    present_after = present.clone()
    present_after[index, restored] = True
    present_after[index, known] = False
    eps_other = torch.randn(z.shape, generator=generator).to(z.device)
    predicted = model(diffusion.noised(z, t, eps_other), t, condition, present_after)
    return (eps_other[index, known] - predicted[index, known]).square().mean()


def _pick(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly chosen True column of each row (drawn on the CPU, where the generator is)."""
    weights = (mask.float() + 1e-9 * (~mask).float()).cpu()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(mask.device)


def training_patterns(rows: int, num_modalities: int, rng: np.random.Generator) -> torch.Tensor:
    """Presence per row: an incomplete non-empty pattern, or nothing present (UNCONDITIONAL_SHARE)."""
    patterns = [p for p in np.ndindex(*(2,) * num_modalities) if 0 < sum(p) < num_modalities]
    chosen = np.array(patterns, dtype=bool)[rng.integers(len(patterns), size=rows)]
    chosen[rng.random(rows) < UNCONDITIONAL_SHARE] = False
    return torch.from_numpy(chosen)


def train_diffusion(model: DiffusionDenoiser, z_train: torch.Tensor, epochs: int, mutual_epochs: int,
                    batch_size: int, lr: float, seed: int, validate: Callable[[], float],
                    progress: Callable) -> tuple[float, int]:
    """L_base for `epochs`, then L_base + L_mutual for `mutual_epochs`; keeps the best validated state.

    `validate` returns a score to maximise (it is called every 10 epochs and at the end). Runs on the device of
    `z_train` (and the model); the noise, steps and patterns are drawn on the CPU from the seed.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    device = z_train.device
    diffusion = GaussianDiffusion(linear_alpha_bar().to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    best, best_epoch, best_state = -np.inf, 0, None
    total = epochs + mutual_epochs
    for epoch in progress(range(total)):
        model.train()
        order = torch.from_numpy(rng.permutation(len(z_train))).to(device)
        for start in range(0, len(order), batch_size):
            batch = z_train[order[start:start + batch_size]]
            present = training_patterns(len(batch), batch.shape[1], rng).to(device)
            loss = base_loss(model, diffusion, batch, present, generator)
            if epoch >= epochs:
                loss = loss + mutual_loss(model, diffusion, batch, present, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == total:
            model.eval()
            with torch.no_grad():
                score = validate()
            if score > best:
                best, best_epoch = score, epoch + 1
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return best, best_epoch
