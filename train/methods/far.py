"""FAR (``generator.method: far``): next-frequency prediction over continuous tokens with the
per-token diffusion loss (Yu et al., arXiv 2503.05305; official code yuhuUSTC/FAR, a fork of
MAR), over the ``kl`` tokenizer's latents.

The same transformer and diffusion head as MAR (``train/models/mar.py``), the head also
conditioned on the frequency level; the input is the latent low-passed to a level, the target
the full latent; sampling steps through ``levels`` (``train/continuous.py`` has the details and
which choices come from the official code). ``levels`` empty = every level 0 … h−1: 8 steps at an
8×8 latent (the official 16×16 schedule is 0, 2, 3, …, 10: 10 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coarse2fine.train import continuous
from coarse2fine.train.methods.base import UnsupportedError, params_section
from coarse2fine.train.methods.mar import CODE, DERIVED, MAR
from coarse2fine.train.models.mar import MARConfig
from coarse2fine.train.steps import unwrap


@dataclass
class FARConfig(MARConfig):
    levels: tuple[int, ...] = ()  # sampling schedule; () = 0, 1, …, h−1
    loss_weight: bool = False  # FAR's optional 1 + sin(π/2·(k+1)/h) per level (off by default, as there)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.levels = tuple(int(k) for k in self.levels)
        side = int(round(self.seq_len ** 0.5))
        if self.levels and (self.levels[0] != 0 or list(self.levels) != sorted(set(self.levels))
                            or self.levels[-1] >= side):
            raise ValueError(f"levels must start at 0 and increase below the latent side {side}, got {list(self.levels)}")

    @property
    def schedule(self) -> list[int]:
        return list(self.levels) or list(range(int(round(self.seq_len ** 0.5))))


class FAR(MAR):
    name = "far"
    summary = "next-frequency autoregression over continuous tokens with a per-token diffusion loss (FAR)"
    config_cls = FARConfig
    params = params_section(FARConfig, DERIVED, "FAR parameters (see train/methods/far.py, train/models/mar.py).")
    code = ("train.methods.far", "train.methods.mar") + CODE
    capabilities = frozenset()
    level_cond = True

    def loss(self, model, tokens, cond_B, tokenizer=None):
        cfg = unwrap(model).cfg
        C, side, _ = self.shape(cfg)
        x = continuous.latent_tokens(tokens, (C, side, side), cfg.latent_scale)  # (B, L, C): the target
        k = int(torch.randint(side, ()))  # one level per batch, uniform over 0 … h−1
        inp = continuous.to_tokens(continuous.lowpass(continuous.to_latent(x, side), k))
        per_token = model(inp, cond_B, None, target_BLC=x, level_B=torch.full((len(x),), float(k), device=x.device))
        weight = continuous.far_loss_weight(k, side) if cfg.loss_weight else 1.0
        return per_token.mean() * weight, {"level": torch.tensor(float(k))}

    @torch.no_grad()
    def sample(self, generator, tokenizer, classes_B, settings, seed, stop=None, prefix=None):
        if stop is not None or prefix is not None or settings.steps is not None:
            raise UnsupportedError(f"generator method {self.name} samples whole latents over its level schedule "
                                   f"(generator.far.levels; no stop scale, prefix or --steps)")
        cfg = generator.cfg
        g = torch.Generator(classes_B.device).manual_seed(seed)
        x = continuous.sample_far(generator, classes_B, cfg.schedule, self.shape(cfg)[1], settings.guidance,
                                  settings.temperature, g)
        return self.decode(tokenizer, x, cfg)

    def steps(self, cfg, settings) -> int:
        return len(cfg.schedule)

    def evaluate(self, pair, images_uri, cfg, settings, num_samples, seed):
        """FID/KID, images/s and forward passes over the level schedule (one row)."""
        from dataclasses import replace

        return self.report(pair, images_uri, cfg, [replace(settings, steps=None)], num_samples, seed)
