"""The per-token diffusion head of MAR and FAR (MAR's ``models/diffloss.py``; FAR's fork adds the
frequency level): a small AdaLN MLP that denoises one continuous token conditioned on the
transformer's output z for that token.

From MAR: the cosine noise schedule over 1000 steps (``alpha_bar(t) = cos((t/T + 0.008)/1.008 ·
π/2)²``, betas capped at 0.999), ε-prediction with an MSE loss, one random t per row,
``SimpleMLPAdaLN`` (sinusoidal 256-frequency timestep embedding through a 2-layer MLP, plus a
linear embedding of z; residual blocks LayerNorm → shift/scale → Linear → SiLU → Linear with a
gate; a final AdaLN layer; AdaLN and output layers zero-initialised), classifier-free guidance on
ε with both halves seeing the same x_t, and temperature scaling the injected sampling noise.
From FAR: the level k enters as ``Linear(1, w)(k)`` (raw k) added to the timestep and z
embeddings. Not as MAR: no learned variance (MAR's ``learn_sigma`` and its variational-bound
term): sampling here is DDIM (Song et al.) over a few evenly spaced steps with ``eta`` = 1 (its
stochastic, DDPM-like end, so that temperature acts as in MAR), which does not use the variance
— few steps because this runs on CPU (MAR samples 100 respaced DDPM steps). Also not as MAR: the
sampler clips x̂0 to the largest |value| among the training targets (``x0_bound``, as ADM clips
x̂0 to the data range; MAR does not clip): with ᾱ at the last step ≈ 2e−9, each 0.01 of ε error
there is ~200 units of x̂0, and a head trained for minutes on CPU predicts ε at t ≈ T to ~0.07
(measured), which without the clip sends samples to ~1e3.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

TRAIN_STEPS = 1000  # MAR's diffusion steps in training
FREQ_DIM = 256  # MAR's TimestepEmbedder frequency_embedding_size


def cosine_alpha_bar(steps: int = TRAIN_STEPS) -> torch.Tensor:
    """ᾱ_t for t = 0 … steps−1 (improved-DDPM cosine schedule, betas capped at 0.999, as MAR)."""
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def timestep_embedding(t_N: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps (N,) → (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_N.device, dtype=torch.float32) / half)
    args = t_N.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(y_NW).chunk(3, dim=-1)
        return x_NW + gate * self.mlp(modulate(self.norm(x_NW), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """ε(x_t, t, z[, k]): tokens (N, token_dim), timesteps (N,), conditions (N, cond_dim)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, level_cond: bool = False) -> None:
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.level_embed = nn.Linear(1, width) if level_cond else None  # FAR's index_cond_embed
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for layer in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_ND: torch.Tensor, t_N: torch.Tensor, z_NC: torch.Tensor,
                level_N: torch.Tensor | None = None) -> torch.Tensor:
        y = self.time_embed(timestep_embedding(t_N)) + self.cond_embed(z_NC)  # (N, w)
        if self.level_embed is not None:
            assert level_N is not None, "this head is conditioned on the frequency level"
            y = y + self.level_embed(level_N.float()[:, None])
        h = self.input_proj(x_ND)
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))


class DiffusionHead(nn.Module):
    """MAR's ``DiffLoss``: the training loss per token and the sampler."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, level_cond: bool = False) -> None:
        super().__init__()
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, width, depth, level_cond)
        self.register_buffer("alpha_bar", cosine_alpha_bar(), persistent=False)
        self.register_buffer("x0_bound", torch.zeros(()))  # largest |target| seen in training (x̂0 clip)

    def loss(self, target_ND: torch.Tensor, z_NC: torch.Tensor, level_N: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """ε-prediction MSE per row (N,), one random t per row (MAR's ``training_losses``)."""
        N = len(target_ND)
        if self.training:
            self.x0_bound = torch.maximum(self.x0_bound, target_ND.detach().abs().max())
        t = torch.randint(0, TRAIN_STEPS, (N,), device=target_ND.device, generator=generator)
        noise = torch.randn(target_ND.shape, device=target_ND.device, generator=generator)
        ab = self.alpha_bar[t][:, None]
        x_t = ab.sqrt() * target_ND + (1 - ab).sqrt() * noise
        return ((self.net(x_t, t, z_NC, level_N) - noise) ** 2).mean(-1)

    @torch.no_grad()
    def sample(self, z_NC: torch.Tensor, steps: int, cfg: float = 1.0, temperature: float = 1.0,
               level_N: torch.Tensor | None = None, eta: float = 1.0, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """DDIM over ``steps`` evenly spaced timesteps. With ``cfg != 1`` the rows of ``z_NC`` are
        [conditional; unconditional] halves (and of ``level_N``), and N/2 tokens come back,
        ε guided as ``uncond + cfg·(cond − uncond)`` (MAR's ``forward_with_cfg``)."""
        guided = cfg != 1.0
        n = len(z_NC) // 2 if guided else len(z_NC)
        dim = self.net.out.out_features
        x = torch.randn(n, dim, device=z_NC.device, generator=generator)
        ts = torch.linspace(TRAIN_STEPS - 1, 0, steps, device=z_NC.device).round().long()
        for i, t in enumerate(ts):
            xin = torch.cat([x, x]) if guided else x
            eps = self.net(xin, t.expand(len(xin)), z_NC, level_N)
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + cfg * (cond - uncond)
            ab = self.alpha_bar[t]
            ab_prev = self.alpha_bar[ts[i + 1]] if i + 1 < steps else torch.ones_like(ab)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if self.x0_bound > 0:  # clip x̂0 to the training range, then ε consistent with it
                x0 = x0.clamp(-self.x0_bound, self.x0_bound)
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp_min(0).sqrt()
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps + sigma * temperature * noise
        return x
