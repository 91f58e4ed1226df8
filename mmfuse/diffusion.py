"""The conditional diffusion restorer: a DiT over modality tokens with Dynamic Modality Gating.

One model restores any pattern of missing modalities in the frozen stage-1 embedding
space (one token per modality, M tokens). Two samplers: conditional DDIM (eta = 0)
over the missing tokens, and ADMC inpainting (joint diffusion, known tokens
re-imposed from a forward-noised copy at every step, starting at step n).
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


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the condition tokens, MLP; conditioned one of four ways.

    gating: x_mid = x + Z_attn * SelfAttn(LN(x)); x_out = x_mid + Z_mlp * MLP(LN(x_mid)), with
            Z = sigmoid(W G + b) from the pooled condition G and b initialised to -5 (DMG).
    adaln:  adaLN-Zero (DiT): shift, scale and gate from the pooled condition, zero-initialised.
    concat: condition tokens join the self-attention sequence; no gates.
    none:   plain residual blocks.
    """

    def __init__(self, width: int, heads: int, conditioning: str):
        super().__init__()
        self.conditioning = conditioning
        self.norm_attn = nn.LayerNorm(width, elementwise_affine=conditioning != "adaln")
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True) if conditioning != "concat" else None
        self.norm_mlp = nn.LayerNorm(width, elementwise_affine=conditioning != "adaln")
        self.mlp = Mlp(width)
        if conditioning == "gating":
            self.gate_attn = nn.Linear(width, width)
            self.gate_mlp = nn.Linear(width, width)
            for gate in (self.gate_attn, self.gate_mlp):
                nn.init.constant_(gate.bias, -5.0)
        elif conditioning == "adaln":
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def gates(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.gate_attn(g)).unsqueeze(1), torch.sigmoid(self.gate_mlp(g)).unsqueeze(1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "adaln":
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(g).unsqueeze(1).chunk(6, dim=-1)
            h = self.norm_attn(x) * (1 + scale_a) + shift_a
            x = x + gate_a * self.attn(h, h, h, need_weights=False)[0]
            x = x + self.cross(self.norm_cross(x), condition, condition, need_weights=False)[0]
            h = self.norm_mlp(x) * (1 + scale_m) + shift_m
            return x + gate_m * self.mlp(h)
        if self.conditioning == "concat":
            h = self.norm_attn(torch.cat([x, condition], dim=1))
            x = x + self.attn(h, h, h, need_weights=False)[0][:, :x.shape[1]]
            return x + self.mlp(self.norm_mlp(x))
        z_attn, z_mlp = self.gates(g) if self.conditioning == "gating" else (1.0, 1.0)
        h = self.norm_attn(x)
        x = x + z_attn * self.attn(h, h, h, need_weights=False)[0]
        x = x + self.cross(self.norm_cross(x), condition, condition, need_weights=False)[0]
        return x + z_mlp * self.mlp(self.norm_mlp(x))


class DiffusionDenoiser(nn.Module):
    """epsilon_theta(x_t, c, t): noise prediction for every modality token."""

    CONDITIONINGS = ("gating", "adaln", "concat", "none")

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
        self.blocks = nn.ModuleList(DiTBlock(width, heads, conditioning) for _ in range(depth))
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


class DiffusionSampler:
    """Samplers over a trained denoiser. Present tokens are never altered in the output."""

    def __init__(self, model: DiffusionDenoiser, steps: int = 10, mode: str = "ddim", admc_start: int = 50,
                 alpha_bar: torch.Tensor | None = None, clip: float | None = None):
        if mode not in ("ddim", "admc"):
            raise ValueError(f"mode must be ddim or admc, got {mode!r}")
        self.model = model.eval()
        self.alpha_bar = linear_alpha_bar() if alpha_bar is None else alpha_bar
        self.steps, self.mode, self.admc_start = steps, mode, admc_start
        self.clip = clip  # bound on |x0_hat| (the data's range); None leaves the estimate as it is

    def timesteps(self) -> list[int]:
        """Descending timesteps the sampler visits: S of [0, T) for DDIM, S of [0, n) for ADMC."""
        top = len(self.alpha_bar) if self.mode == "ddim" else self.admc_start
        steps = min(self.steps, top)
        return sorted({int(round(v)) for v in torch.linspace(0, top - 1, steps).tolist()}, reverse=True)

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """z_{t-1} = sqrt(a_prev) (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev) eps  (eta = 0)."""
        a_t = self.alpha_bar[t]
        a_prev = self.alpha_bar[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip is not None:  # early estimates divide by sqrt(a_t) ~ 0.006: keep them in range
            x0 = x0.clamp(-self.clip, self.clip)
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def noised(self, z: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar[t].sqrt() * z + (1 - self.alpha_bar[t]).sqrt() * noise

    @torch.no_grad()
    def sample(self, z: torch.Tensor, present: torch.Tensor, noise: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Restore missing tokens. `noise` [steps+1, B, M, E] supplies every Gaussian draw (determinism);
        `prior` [M, E] is the training mean, the ADMC start point for missing tokens."""
        keep = present.unsqueeze(-1)
        schedule = self.timesteps()
        if self.mode == "ddim":
            x = torch.where(keep, self.noised(z, schedule[0], noise[0]), noise[0])
            condition_present = present
        else:  # ADMC: joint diffusion from step n; unknown tokens start from the prior forward-noised to n
            x = self.noised(torch.where(keep, z, prior.expand_as(z)), schedule[0], noise[0])
            condition_present = torch.zeros_like(present)
        for i, t in enumerate(schedule):
            t_prev = schedule[i + 1] if i + 1 < len(schedule) else -1
            eps = self.model(x, torch.full((len(z),), t, device=z.device), z, condition_present)
            x = self.ddim_step(x, eps, t, t_prev)
            if t_prev >= 0:  # re-impose the known tokens at the next noise level
                x = torch.where(keep, self.noised(z, t_prev, noise[i + 1]), x)
        return torch.where(keep, z, x)
