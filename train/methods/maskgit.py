"""MaskGIT over one token column (CQ seed §3.3, ``generator.method: maskgit``): the masked
generator CQ uses over its channel tokens; it also models a single spatial map (the ``vqgan``
baseline, or ViT-VQGAN's one scale).

From the seed: bidirectional transformer, masked prediction, parallel confidence-based decoding,
CFG ℓ = t·ℓ_c − (t−1)·ℓ_u (eq. 4), 10 decoding steps for its main results (Table 1) and 10 vs 64
in Table 7, AdamW β = (0.9, 0.96) (§4.1). From MaskGIT: the cosine mask schedule, cross-entropy on
masked tokens only, annealed Gumbel noise on the confidences (``train/masked.py``). QK-norm is ours.
"""

from __future__ import annotations

import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.methods.base import GeneratorMethod, UnsupportedError, check, params_section
from coarse2fine.train.models.maskgit import MaskGITConfig, build_maskgit
from coarse2fine.train.steps import unwrap

DEFAULT_STEPS = 10  # CQ seed Table 1 ("10" sampling steps for Ours-B/L)


class MaskGIT(GeneratorMethod):
    name = "maskgit"
    summary = "masked bidirectional generation with parallel iterative decoding (CQ seed §3.3, MaskGIT)"
    config_cls = MaskGITConfig
    params = params_section(MaskGITConfig, ("seq_len", "codebook_size", "num_classes"),
                            "MaskGIT parameters (see train/models/maskgit.py).")
    code = ("train.methods.maskgit", "train.models.maskgit", "train.masked", "train.sampling")
    capabilities = frozenset({"steps"})
    betas = (0.9, 0.96)  # CQ seed §4.1
    example_layout = [TokenColumn("ids", (1,), "int32", 2, "channel")]

    def accept(self, layout: list[TokenColumn]) -> None:
        check(len(layout) == 1 and layout[0].dtype == "int32" and layout[0].role in ("channel", "scale"),
              f"generator method {self.name} models one column of int32 tokens (channel tokens or one spatial map); "
              f"this dataset has {', '.join(f'{c.name} ({c.role}, {c.dtype})' for c in layout)}")

    def model_config(self, params, layout: list[TokenColumn], num_classes: int) -> MaskGITConfig:
        self.accept(layout)
        return MaskGITConfig(seq_len=layout[0].size, codebook_size=layout[0].vocab, num_classes=num_classes,
                             **params.model_dump())

    def build(self, model_cfg: MaskGITConfig):
        return build_maskgit(model_cfg)

    def loss(self, model, tokens, cond_B, tokenizer=None):
        from coarse2fine.train.masked import masked_loss

        cfg = unwrap(model).cfg
        return masked_loss(model, tokens, cond_B, cfg.mask_id)

    def sample(self, generator, tokenizer, classes_B, settings, seed, stop=None, prefix=None):
        from coarse2fine.train.masked import decode

        if stop is not None or prefix is not None:
            raise UnsupportedError(f"generator method {self.name} decodes whole sequences (no stop scale or prefix)")
        g = torch.Generator(classes_B.device).manual_seed(seed)
        ids = decode(generator, classes_B, settings.steps or DEFAULT_STEPS, settings.guidance, settings.temperature,
                     settings.top_k, settings.top_p, g)
        with torch.no_grad():
            images = tokenizer.decode_indices(ids).clamp(0, 1)
        return ids, images

    def passes(self, model_cfg, settings):
        """One bidirectional pass per decoding step."""
        return {"forward_passes": min(settings.steps or DEFAULT_STEPS, model_cfg.seq_len), "diffusion_passes": 0}

    def evaluate(self, pair, images_uri, cfg, settings, num_samples, seed):
        """CQ Table 7 in miniature: FID/KID and images/s at the default and at one-token-per-step
        decoding (10 vs 64 steps in the seed, where the sequence has 64+ tokens)."""
        from dataclasses import replace

        from coarse2fine.evaluate.fid import Evaluator
        from coarse2fine.evaluate.generator_eval import GeneratorReport, balanced_classes, sample_row

        gen, tok = pair.generator, pair.tokenizer
        classes = balanced_classes(num_samples, gen.cfg.num_classes, next(gen.parameters()).device)
        ev = Evaluator(cfg)
        rows, grid = [], []
        self.sample(gen, tok, classes[:1], settings, seed)  # warm-up: one-off initialisation is not throughput
        for steps in sorted({min(settings.steps or DEFAULT_STEPS, gen.cfg.seq_len), gen.cfg.seq_len}):
            at = replace(settings, steps=steps)
            out = sample_row(lambda c, i: self.sample(gen, tok, c, at, seed + i)[1], classes, cfg, ev, images_uri,
                             desc=f"generated, {steps} steps")
            rows.append({"steps": steps, "tokens": gen.cfg.seq_len} | self.passes(gen.cfg, at) | out.metrics)
            grid.append(out.images[:8])
        return GeneratorReport(rows, "steps", "steps", "steps", torch.cat(grid).numpy())
