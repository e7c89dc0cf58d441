"""Training losses and samplers over continuous tokens: MAR's masked autoregression and FAR's
next-frequency prediction, both with the per-token diffusion head (``models/diffusion.py``) on
the transformer of ``models/mar.py``.

Latents: a tokens row holds the posterior mean and log-variance (``kl`` tokenizer); training
draws a posterior sample and multiplies it by the layout's ``latent_scale`` (MAR's
``posterior.sample().mul_(0.2325)``); samples are divided by it before decoding.

MAR (``models/mar.py`` ``forward``/``sample_tokens`` of LTH14/mar): one mask ratio per batch from
a normal(1, 0.25) truncated to [0.7, 1], a random order per image, the diffusion loss on masked
tokens only; sampling reveals tokens over a cosine schedule (at least one per step), with CFG
rising linearly with the share of tokens revealed and a constant temperature.

FAR (``models/far.py`` of yuhuUSTC/FAR, the default unmasked path): level k = area-downsample the
latent to k×k then bicubic back (level 0 = zeros); one level drawn uniformly per batch from
0 … h−1; the target is always the full latent (all tokens); the level conditions the diffusion
head; optional loss weight 1 + sin(π/2·(k+1)/h) (off by default, as there; the released code
cannot apply it, here it weights the batch of level k). Sampling runs the level schedule, each
step predicting the whole latent and low-passing it to the next level (the last step unfiltered),
CFG ramping as 1 + (cfg − 1)·step/n and temperature as τ·(0.8 + 0.2·(1 − cos(π/2·(step+1)/n)))
(the official code fixes τ = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK_RATIO_MIN, MASK_RATIO_STD = 0.7, 0.25  # MAR: truncnorm((0.7 - 1) / 0.25, 0, loc=1, scale=0.25)


def latent_tokens(tokens_BT: torch.Tensor, shape: tuple[int, int, int], scale: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """[mean, logvar] rows (B, 2·C·h·w) → a scaled posterior sample as tokens (B, h·w, C)."""
    C, h, w = shape
    n = C * h * w
    mean, logvar = tokens_BT[:, :n].view(-1, C, h, w), tokens_BT[:, n: 2 * n].view(-1, C, h, w)
    noise = torch.randn(mean.shape, device=mean.device, generator=generator)
    return to_tokens((mean + noise * (0.5 * logvar).exp()) * scale)


def to_tokens(z_BChw: torch.Tensor) -> torch.Tensor:
    return z_BChw.flatten(2).transpose(1, 2)  # (B, h·w, C)


def to_latent(x_BLC: torch.Tensor, side: int) -> torch.Tensor:
    return x_BLC.transpose(1, 2).reshape(len(x_BLC), -1, side, side)  # (B, C, h, w)


def lowpass(z_BChw: torch.Tensor, k: int) -> torch.Tensor:
    """FAR's frequency level k of a latent: area-downsample to k×k, bicubic back; level 0 = zeros."""
    if k == 0:
        return torch.zeros_like(z_BChw)
    return F.interpolate(F.interpolate(z_BChw, size=(k, k), mode="area"), size=z_BChw.shape[-2:], mode="bicubic")


def mask_ratio(generator: torch.Generator | None = None, device=None) -> float:
    """MAR's training mask ratio: normal(1, 0.25) truncated to [0.7, 1] (rejection sampling)."""
    while True:
        r = 1 - abs(float(torch.randn((), generator=generator, device=device))) * MASK_RATIO_STD
        if r >= MASK_RATIO_MIN:
            return r


def random_mask(B: int, L: int, rate: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) bool: ⌈L·rate⌉ masked tokens per row at random positions (MAR's ``random_masking``)."""
    order = torch.rand(B, L, device=device, generator=generator).argsort(dim=1)
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    return mask.scatter(1, order[:, : math.ceil(L * rate)], True)


def far_loss_weight(k: int, side: int) -> float:
    """FAR's optional level weight 1 + sin(π/2·(k+1)/h)."""
    return 1 + math.sin(math.pi / 2 * (k + 1) / side)


def _guided(x: torch.Tensor, guided: bool) -> torch.Tensor:
    return torch.cat([x, x]) if guided else x


@torch.no_grad()
def sample_mar(model, cond_B: torch.Tensor, steps: int, cfg: float, temperature: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """MAR's ``sample_tokens``: scaled latent tokens (B, L, C) in ``steps`` reveal steps."""
    c = model.cfg
    B, L, dev = len(cond_B), c.seq_len, cond_B.device
    guided = cfg != 1.0
    cond = torch.cat([cond_B, torch.full_like(cond_B, c.null_class)]) if guided else cond_B
    x = torch.zeros(B, L, c.token_dim, device=dev)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    order = torch.rand(B, L, device=dev, generator=generator).argsort(dim=1)  # reveal order per image
    for step in range(steps):
        z = model(_guided(x, guided), cond, _guided(mask, guided))  # (B or 2B, L, D)
        left = int(mask[0].sum())
        mask_len = 0 if step == steps - 1 else max(1, min(left - 1, math.floor(L * math.cos(math.pi / 2 * (step + 1) / steps))))
        nxt = torch.zeros_like(mask).scatter(1, order[:, :mask_len], True) if mask_len else torch.zeros_like(mask)
        pred = mask & ~nxt  # (B, L): revealed now
        cfg_step = 1 + (cfg - 1) * (L - mask_len) / L  # MAR's "linear" CFG schedule
        zs = z[_guided(pred, guided)] if guided and cfg_step != 1 else z[: B][pred]
        x[pred] = model.head.sample(zs, c.diffusion_steps, cfg_step, temperature, generator=generator)
        mask = nxt
    return x


@torch.no_grad()
def sample_far(model, cond_B: torch.Tensor, levels: list[int], side: int, cfg: float, temperature: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """FAR's ``sample_tokens_nomask``: scaled latent tokens (B, L, C), one step per level."""
    c = model.cfg
    B, n, dev = len(cond_B), len(levels), cond_B.device
    guided = cfg != 1.0
    cond = torch.cat([cond_B, torch.full_like(cond_B, c.null_class)]) if guided else cond_B
    x = torch.zeros(B, c.seq_len, c.token_dim, device=dev)  # level 0 input
    for step, k in enumerate(levels):
        z = model(_guided(x, guided), cond)  # (B or 2B, L, D)
        cfg_step = 1 + (cfg - 1) * step / n
        temp_step = temperature * (0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (step + 1) / n)))
        zs = z.flatten(0, 1) if guided and cfg_step != 1 else z[:B].flatten(0, 1)
        level = torch.full((len(zs),), float(k), device=dev)
        pred = model.head.sample(zs, c.diffusion_steps, cfg_step, temp_step, level, generator=generator)
        x = pred.view(B, c.seq_len, c.token_dim)
        if step + 1 < n:
            x = to_tokens(lowpass(to_latent(x, side), levels[step + 1]))
    return x
