"""CART's next-detail prediction (CART seed §3.3, eq. 13) as a generator plug-in
(``generator.method: cart``), over the tokens of the ``cart`` tokenizer (any order; order 0 is
VAR's next-scale prediction, the seed's Table 4 baseline).

Loss: cross-entropy over every token of every map (VAR; the seed gives no other), reported per
map (nats/token, chance ln V). Sampling: one transformer call per map with a KV cache, all tokens
of a map drawn in parallel, CFG / temperature / top-k / top-p; the next map's input is the
tokenizer's cumulative reconstruction (``CARTTokenizer.map_input``), the same values teacher
forcing uses (``CARTTokenizer.teacher_inputs``). AdamW β = (0.9, 0.95) as VAR; the seed's
initial learning rate 1e-4 (§4.1) is ``generator.train.lr``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.methods.base import GeneratorMethod, UnsupportedError, check, params_section
from coarse2fine.train.models.cart_ar import CARTARConfig, build_cart_ar
from coarse2fine.train.sampling import filter_logits, guided_logits
from coarse2fine.train.steps import unwrap


class CARTAR(GeneratorMethod):
    name = "cart"
    summary = "next-detail prediction: block-causal transformer over base and detail token maps (CART seed §3.3)"
    config_cls = CARTARConfig
    params = params_section(CARTARConfig, ("map_sides", "codebook_size", "code_dim", "num_classes"),
                            "CART generator parameters (see train/models/cart_ar.py).")
    code = ("train.methods.cart_ar", "train.models.cart_ar", "train.models.blocks", "train.sampling")
    betas = (0.9, 0.95)  # VAR
    example_layout = [TokenColumn("base_0", (1, 1), "int32", 2, "base", 1)]

    def accept(self, layout: list[TokenColumn]) -> None:
        check(len(layout) > 0 and all(c.role in ("base", "detail") and c.dtype == "int32" for c in layout)
              and layout[0].role == "base",
              f"generator method {self.name} models CART base/detail token maps; this dataset has "
              f"{', '.join(f'{c.name} ({c.role}, {c.dtype})' for c in layout)}")
        check(all(len(c.shape) == 2 and c.shape[0] == c.shape[1] for c in layout)
              and len({(c.vocab, c.code_dim) for c in layout}) == 1 and layout[0].code_dim > 0,
              f"generator method {self.name} needs square maps sharing one codebook with its code dimension")

    def model_config(self, params, layout: list[TokenColumn], num_classes: int) -> CARTARConfig:
        self.accept(layout)
        return CARTARConfig(map_sides=tuple(c.shape[0] for c in layout), codebook_size=layout[0].vocab,
                            code_dim=layout[0].code_dim, num_classes=num_classes, **params.model_dump())

    def build(self, model_cfg: CARTARConfig):
        return build_cart_ar(model_cfg)

    def loss(self, model, ids_BL, cond_B, tokenizer=None):
        assert tokenizer is not None, "CART's inputs are its tokenizer's reconstructions"
        cfg = unwrap(model).cfg
        logits = model(tokenizer.teacher_inputs(ids_BL), cond_B)  # (B, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids_BL.flatten(), reduction="none")  # (B·L,)
        per_map = nll.detach().view(len(ids_BL), -1).split(cfg.map_sizes, dim=1)
        return nll.mean(), {f"nll/map_{m}": v.mean() for m, v in enumerate(per_map)}

    @torch.no_grad()
    def sample(self, generator, tokenizer, classes_B, settings, seed, stop=None, prefix=None, on_logits=None):
        """Maps drawn one at a time (KV cache); ``prefix`` (B, P) fixes the first maps (P on a map
        boundary) and ``on_logits(m, logits)`` sees each map's (guided) logits (tests)."""
        if stop is not None:
            raise UnsupportedError(f"generator method {self.name} decodes whole sequences (no stop scale)")
        cfg = generator.cfg
        B, guided = len(classes_B), settings.guidance != 1.0
        g = torch.Generator(classes_B.device).manual_seed(seed)
        cond = torch.cat([classes_B, torch.full_like(classes_B, cfg.null_class)]) if guided else classes_B
        forced = tokenizer.split(prefix) if prefix is not None else []
        cache, f_hat, maps, x = generator.new_cache(len(cond)), tokenizer.empty_features(B), [], None
        for m, side in enumerate(cfg.map_sides):
            logits = generator.map_logits(m, None if m == 0 else torch.cat([x, x]) if guided else x, cond, cache).float()
            if guided:
                logits = guided_logits(*logits.chunk(2), settings.guidance)  # (B, s², V)
            if on_logits is not None:
                on_logits(m, logits)
            if m < len(forced):
                ids = forced[m].reshape(B, -1)
            else:
                probs = filter_logits(logits.flatten(0, 1) / settings.temperature, settings.top_k,
                                      settings.top_p).softmax(-1)  # (B·s², V)
                ids = torch.multinomial(probs, 1, generator=g).view(B, -1)  # (B, s²)
            maps.append(ids)
            f_hat = tokenizer.add_map(f_hat, m, ids.view(B, side, side))
            if m + 1 < len(cfg.map_sides):
                x = tokenizer.map_input(f_hat, m + 1)  # (B, s_{m+1}², C)
        return torch.cat(maps, dim=1), tokenizer.decode(f_hat).clamp(0, 1)

    def passes(self, model_cfg, settings):
        """One KV-cached pass per map (all its tokens at once, as VAR)."""
        return {"forward_passes": len(model_cfg.map_sides), "diffusion_passes": 0}

    def evaluate(self, pair, images_uri, cfg, settings, num_samples, seed):
        """CART Table 4 in miniature: FID/KID and images/s of full sequences (one row)."""
        from coarse2fine.evaluate.fid import Evaluator
        from coarse2fine.evaluate.generator_eval import GeneratorReport, balanced_classes, sample_row

        gen, tok = pair.generator, pair.tokenizer
        classes = balanced_classes(num_samples, gen.cfg.num_classes, next(gen.parameters()).device)
        self.sample(gen, tok, classes[:1], settings, seed)  # warm-up: one-off initialisation is not throughput
        out = sample_row(lambda c, i: self.sample(gen, tok, c, settings, seed + i)[1], classes, cfg, Evaluator(cfg),
                         images_uri, desc=f"generated, {len(gen.cfg.map_sides)} maps")
        row = {"maps": len(gen.cfg.map_sides), "tokens": gen.cfg.seq_len} | self.passes(gen.cfg, settings) | out.metrics
        return GeneratorReport([row], "maps", "maps", "maps", out.images[:8].numpy())
