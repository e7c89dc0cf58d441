"""MAR (``generator.method: mar``): masked autoregression over continuous tokens with a per-token
diffusion loss (Li et al. 2024, LTH14/mar), FAR's baseline, over the ``kl`` tokenizer's latents.

Training and sampling: ``train/continuous.py`` (MAR's masking, reveal schedule, CFG ramp);
network: ``train/models/mar.py`` and ``train/models/diffusion.py``. ``--steps`` sets the number of
reveal steps (MAR's ``num_iter``, default 64: one token per step at an 8×8 latent). AdamW
β = (0.9, 0.95) as MAR.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train import continuous
from coarse2fine.train.methods.base import GeneratorMethod, UnsupportedError, check, params_section
from coarse2fine.train.models.mar import MARConfig, build_mar
from coarse2fine.train.steps import unwrap

DEFAULT_STEPS = 64  # MAR's num_iter default
FEW_STEPS = 8  # the evaluation's second row: FAR's order of steps
DERIVED = ("seq_len", "token_dim", "latent_scale", "num_classes", "level_cond")
CODE = ("train.continuous", "train.models.mar", "train.models.diffusion", "train.models.blocks")


class MAR(GeneratorMethod):
    name = "mar"
    summary = "masked autoregression over continuous tokens with a per-token diffusion loss (MAR; FAR's baseline)"
    config_cls = MARConfig
    params = params_section(MARConfig, DERIVED, "MAR parameters (see train/models/mar.py).")
    code = ("train.methods.mar",) + CODE
    capabilities = frozenset({"steps"})
    betas = (0.9, 0.95)  # MAR
    level_cond = False  # FAR conditions the diffusion head on the frequency level
    example_layout = [TokenColumn("mean", (1, 1, 1), "float16", 0, "latent"),
                      TokenColumn("logvar", (1, 1, 1), "float16", 0, "latent")]

    def accept(self, layout: list[TokenColumn]) -> None:
        check([(c.name, c.role, c.dtype) for c in layout] == [("mean", "latent", "float16"), ("logvar", "latent", "float16")]
              and layout[0].shape == layout[1].shape and len(layout[0].shape) == 3
              and layout[0].shape[1] == layout[0].shape[2],
              f"generator method {self.name} models continuous latents (mean and logvar of a square latent, the kl "
              f"tokenizer); this dataset has {', '.join(f'{c.name} ({c.role}, {c.dtype})' for c in layout)}")

    def model_config(self, params, layout: list[TokenColumn], num_classes: int) -> MARConfig:
        self.accept(layout)
        C, h, w = layout[0].shape
        return self.config_cls(seq_len=h * w, token_dim=C, latent_scale=layout[0].scale, num_classes=num_classes,
                               level_cond=self.level_cond, **params.model_dump())

    def build(self, model_cfg):
        return build_mar(model_cfg)

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        side = int(round(cfg.seq_len ** 0.5))
        return cfg.token_dim, side, side

    def loss(self, model, tokens, cond_B, tokenizer=None):
        cfg = unwrap(model).cfg
        x = continuous.latent_tokens(tokens, self.shape(cfg), cfg.latent_scale)  # (B, L, C)
        mask = continuous.random_mask(len(x), cfg.seq_len, continuous.mask_ratio(), x.device)  # (B, L)
        per_token = model(x, cond_B, mask, target_BLC=x)  # (B, L)
        loss = (per_token * mask).sum() / mask.sum()
        return loss, {"masked_share": mask.float().mean()}

    def decode(self, tokenizer, x_BLC, cfg):
        """Scaled latent tokens → (latents (B, C·h·w), images in [0, 1])."""
        z = continuous.to_latent(x_BLC, self.shape(cfg)[1]) / cfg.latent_scale
        return z.flatten(1), tokenizer.decode(z).clamp(0, 1)

    @torch.no_grad()
    def sample(self, generator, tokenizer, classes_B, settings, seed, stop=None, prefix=None):
        if stop is not None or prefix is not None:
            raise UnsupportedError(f"generator method {self.name} decodes whole latents (no stop scale or prefix)")
        g = torch.Generator(classes_B.device).manual_seed(seed)
        x = continuous.sample_mar(generator, classes_B, min(settings.steps or DEFAULT_STEPS, generator.cfg.seq_len),
                                  settings.guidance, settings.temperature, g)
        return self.decode(tokenizer, x, generator.cfg)

    def passes(self, model_cfg, settings):
        """The transformer once per step, the diffusion head ``diffusion_steps`` times per step (on
        the tokens revealed at that step)."""
        steps = self.steps(model_cfg, settings)
        return {"forward_passes": steps, "diffusion_passes": steps * model_cfg.diffusion_steps}

    def evaluate(self, pair, images_uri, cfg, settings, num_samples, seed):
        """FID/KID, images/s and forward passes at MAR's default steps and at FAR's order (8)."""
        steps = sorted({min(s, pair.generator.cfg.seq_len) for s in (settings.steps or DEFAULT_STEPS, FEW_STEPS)})
        return self.report(pair, images_uri, cfg, [replace(settings, steps=s) for s in steps], num_samples, seed)

    def report(self, pair, images_uri, cfg, runs, num_samples, seed):
        from coarse2fine.evaluate.fid import Evaluator
        from coarse2fine.evaluate.generator_eval import GeneratorReport, balanced_classes, sample_row

        gen, tok = pair.generator, pair.tokenizer
        classes = balanced_classes(num_samples, gen.cfg.num_classes, next(gen.parameters()).device)
        ev = Evaluator(cfg)
        self.sample(gen, tok, classes[:1], runs[0], seed)  # warm-up: one-off initialisation is not throughput
        rows, grid = [], []
        for at in runs:
            n = self.steps(gen.cfg, at)
            out = sample_row(lambda c, i: self.sample(gen, tok, c, at, seed + i)[1], classes, cfg, ev, images_uri,
                             desc=f"generated, {n} steps")
            rows.append({"steps": n, "latent_floats": gen.cfg.seq_len * gen.cfg.token_dim}
                        | self.passes(gen.cfg, at) | out.metrics)
            grid.append(out.images[:8])
        return GeneratorReport(rows, "steps", "steps", "steps", torch.cat(grid).numpy())

    def steps(self, cfg, settings) -> int:
        return min(settings.steps or DEFAULT_STEPS, cfg.seq_len)
