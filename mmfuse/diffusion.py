"""The conditional diffusion restorer: a DiT over modality tokens with Dynamic Modality Gating.

One model restores any pattern of missing modalities in the frozen stage-1 embedding
space (one token per modality, M tokens); one block class per conditioning (`BLOCKS`).
`GaussianDiffusion` owns the process: noising, x0 estimates, and two samplers,
conditional DDIM (eta = 0) over the missing tokens and ADMC inpainting (joint
diffusion, known tokens re-imposed from a forward-noised copy at every step, from step n).
"""

from __future__ import annotations

import math

import torch
from torch import nn

T_STEPS = 1000


def linear_alpha_bar(steps: int = T_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Cumulative products alpha_bar_t, t = 0 .. steps-1 (DDPM's linear schedule)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, steps, dtype=torch.float64), 0).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """Available tokens -> condition tokens; a learned mask embedding stands in for each missing one."""

    def __init__(self, num_modalities: int, embed_dim: int, width: int):
        super().__init__()
        self.project = nn.Linear(embed_dim, width)
        self.mask_embedding = nn.Parameter(torch.zeros(num_modalities, width))
        self.position = nn.Parameter(torch.zeros(num_modalities, width))
        nn.init.normal_(self.mask_embedding, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        tokens = torch.where(present.unsqueeze(-1), self.project(z), self.mask_embedding)
        return tokens + self.position


class ProbePooling(nn.Module):
    """G_pooled = Softmax(Q_probe (W_K C)^T / sqrt(d_k)) (W_V C); G = MLP_gate(G_pooled)."""

    def __init__(self, width: int, probes: int = 4):
        super().__init__()
        self.probes = nn.Parameter(torch.randn(probes, width) * 0.02)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.gate_mlp = nn.Sequential(nn.Linear(probes * width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        scores = self.probes @ self.key(condition).transpose(1, 2) / math.sqrt(condition.shape[-1])
        pooled = scores.softmax(dim=-1) @ self.value(condition)  # [B, probes, width]
        return self.gate_mlp(pooled.flatten(1))


class Mlp(nn.Sequential):
    def __init__(self, width: int, ratio: int = 4):
        super().__init__(nn.Linear(width, width * ratio), nn.GELU(), nn.Linear(width * ratio, width))


class Block(nn.Module):
    """What every DiT block has: self-attention, cross-attention to the condition tokens, an MLP."""

    affine = True  # LayerNorms before the attention and the MLP learn their own scale (adaLN brings one)
    cross_attention = True

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width, elementwise_affine=self.affine)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True) if self.cross_attention else None
        self.norm_mlp = nn.LayerNorm(width, elementwise_affine=self.affine)
        self.mlp = Mlp(width)

    def self_attention(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(h, h, h, need_weights=False)[0]

    def cross_attend(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return x + self.cross(self.norm_cross(x), condition, condition, need_weights=False)[0]


class PlainBlock(Block):
    """No conditioning beyond the cross-attention: plain residual blocks."""

    def forward(self, x: torch.Tensor, condition: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.norm_attn(x))
        x = self.cross_attend(x, condition)
        return x + self.mlp(self.norm_mlp(x))


class GatedBlock(Block):
    """Dynamic Modality Gating: x_mid = x + Z_attn * SelfAttn(LN(x)); x_out = x_mid + Z_mlp * MLP(LN(x_mid)),
    Z = sigmoid(W G + b) from the pooled condition G, b initialised to -5 (the gates start nearly shut)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.gate_attn = nn.Linear(width, width)
        self.gate_mlp = nn.Linear(width, width)
        for gate in (self.gate_attn, self.gate_mlp):
            nn.init.constant_(gate.bias, -5.0)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        z_attn, z_mlp = torch.sigmoid(self.gate_attn(g)).unsqueeze(1), torch.sigmoid(self.gate_mlp(g)).unsqueeze(1)
        x = x + z_attn * self.self_attention(self.norm_attn(x))
        x = self.cross_attend(x, condition)
        return x + z_mlp * self.mlp(self.norm_mlp(x))


class AdaLNBlock(Block):
    """adaLN-Zero (DiT): shift, scale and gate of the attention and the MLP from the pooled condition,
    zero-initialised so each block starts as the identity."""

    affine = False

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(g).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_a * self.self_attention(self.norm_attn(x) * (1 + scale_a) + shift_a)
        x = self.cross_attend(x, condition)
        return x + gate_m * self.mlp(self.norm_mlp(x) * (1 + scale_m) + shift_m)


class ConcatBlock(Block):
    """The condition tokens join the self-attention sequence; no cross-attention, no gates."""

    cross_attention = False

    def forward(self, x: torch.Tensor, condition: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.norm_attn(torch.cat([x, condition], dim=1)))[:, :x.shape[1]]
        return x + self.mlp(self.norm_mlp(x))


BLOCKS = {"gating": GatedBlock, "adaln": AdaLNBlock, "concat": ConcatBlock, "none": PlainBlock}


class DiffusionDenoiser(nn.Module):
    """epsilon_theta(x_t, c, t): noise prediction for every modality token."""

    CONDITIONINGS = tuple(BLOCKS)

    def __init__(self, num_modalities: int, embed_dim: int, width: int = 128, depth: int = 3, heads: int = 4,
                 conditioning: str = "gating", probes: int = 4):
        super().__init__()
        if conditioning not in self.CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(self.CONDITIONINGS)}, got {conditioning!r}")
        self.width = width
        self.conditioning = conditioning
        self.input = nn.Linear(embed_dim, width)
        self.position = nn.Parameter(torch.randn(num_modalities, width) * 0.02)
        self.condition = ConditionEmbedding(num_modalities, embed_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.pool = ProbePooling(width, probes)
        self.blocks = nn.ModuleList(BLOCKS[conditioning](width, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, embed_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_known: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(timestep_embedding(t, self.width)).unsqueeze(1)
        condition = self.condition(z_known, present) + time  # C = Condition_emb(available) + MLP_time(t_emb)
        g = self.pool(condition)
        x = self.input(x_t) + self.position + time
        for block in self.blocks:
            x = block(x, condition, g)
        return self.output(self.out_norm(x))


class GaussianDiffusion:
    """The diffusion process in embedding space: forward noising, x0 estimates, DDIM steps and the two samplers.
    Training's losses and the restorer's sampling both go through it. Present tokens never change in a sample."""

    def __init__(self, alpha_bar: torch.Tensor | None = None, clip: float | None = None):
        self.alpha_bar = linear_alpha_bar() if alpha_bar is None else alpha_bar
        self.clip = clip  # bound on |x0_hat| (the data's range); None leaves the estimate as it is

    def a(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha_bar_t on the device of the tensors it scales: a scalar for an int t, [B, 1, 1] for a tensor."""
        if isinstance(t, int):
            return self.alpha_bar[t]
        return self.alpha_bar.to(t.device)[t].view(-1, 1, 1)

    def noised(self, z: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """q(z_t | z_0): sqrt(a_t) z + sqrt(1 - a_t) eps."""
        a = self.a(t)
        return a.sqrt() * z + (1 - a).sqrt() * eps

    def x0_estimate(self, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0_hat = (x_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t)."""
        a = self.a(t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """z_{t-1} = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps  (eta = 0); t_prev = -1 is the data itself."""
        a_t = self.alpha_bar[t]
        a_prev = self.alpha_bar[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        x0 = self.x0_estimate(x_t, eps, t)
        if self.clip is not None:  # early estimates divide by sqrt(a_t) ~ 0.006: keep them in range
            x0 = x0.clamp(-self.clip, self.clip)
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def timesteps(self, steps: int, mode: str = "ddim", admc_start: int = 50) -> list[int]:
        """Descending timesteps a sampler visits: `steps` of [0, T) for DDIM, of [0, admc_start) for ADMC."""
        top = len(self.alpha_bar) if mode == "ddim" else admc_start
        return sorted({int(round(v)) for v in torch.linspace(0, top - 1, min(steps, top)).tolist()}, reverse=True)

    @torch.no_grad()
    def sample(self, model: DiffusionDenoiser, z: torch.Tensor, present: torch.Tensor, noise: torch.Tensor,
               prior: torch.Tensor, steps: int = 10, mode: str = "ddim", admc_start: int = 50) -> torch.Tensor:
        """Restore the missing tokens: conditional DDIM over them, or ADMC inpainting (joint diffusion from step
        n, the known tokens re-imposed from a forward-noised copy at every step). `noise` [steps+1, B, M, E]
        supplies every Gaussian draw (determinism); `prior` [M, E], the training mean, is ADMC's start point."""
        if mode not in SAMPLERS:
            raise ValueError(f"mode must be one of {', '.join(SAMPLERS)}, got {mode!r}")
        keep = present.unsqueeze(-1)
        schedule = self.timesteps(steps, mode, admc_start)
        if mode == "ddim":
            x = torch.where(keep, self.noised(z, schedule[0], noise[0]), noise[0])
            condition_present = present
        else:  # unknown tokens start from the prior forward-noised to n; the denoiser sees no condition
            x = self.noised(torch.where(keep, z, prior.expand_as(z)), schedule[0], noise[0])
            condition_present = torch.zeros_like(present)
        for i, t in enumerate(schedule):
            t_prev = schedule[i + 1] if i + 1 < len(schedule) else -1
            eps = model(x, torch.full((len(z),), t, device=z.device), z, condition_present)
            x = self.ddim_step(x, eps, t, t_prev)
            if t_prev >= 0:  # re-impose the known tokens at the next noise level
                x = torch.where(keep, self.noised(z, t_prev, noise[i + 1]), x)
        return torch.where(keep, z, x)


SAMPLERS = ("ddim", "admc")
