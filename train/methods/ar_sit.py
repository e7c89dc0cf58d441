"""AR-SIT (SIT seed §4.2, §5.3–5.5) as a generator plug-in (``generator.method: ar_sit``).

Accepts a layout of int32 ``scale`` columns with equal token counts and one vocabulary (SIT, or
one column of the ViT-VQGAN baseline: then it is the Parti-style spatial baseline). The sequence
is the columns in order, raster order inside each. Loss: softmax cross-entropy on the full
coarse-to-fine sequence (seed B.2: the only loss), reported per scale (nats/token; chance is ln V).
"""

from __future__ import annotations

import torch.nn.functional as F

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.methods.base import GeneratorMethod, check, params_section
from coarse2fine.train.models.arsit import ARSITConfig, build_generator
from coarse2fine.train.steps import unwrap

# the tokens layout and the data set these
DERIVED = ("num_scales", "tokens_per_scale", "codebook_size", "num_classes")


class ARSIT(GeneratorMethod):
    name = "ar_sit"
    summary = "coarse-to-fine autoregression over scale tokens, KV cache, CFG (SIT seed §4.2)"
    config_cls = ARSITConfig
    params = params_section(ARSITConfig, DERIVED, "AR-SIT parameters (see train/models/arsit.py).")
    code = ("train.methods.ar_sit", "train.models.arsit", "train.models.blocks", "train.sampling", "train.generate")
    capabilities = frozenset({"stop_scale", "refine", "upsample", "edit"})
    betas = (0.9, 0.95)  # VAR / LlamaGen (the seed gives none)
    example_layout = [TokenColumn("ids_0", (1, 1), "int32", 2, "scale")]

    def accept(self, layout: list[TokenColumn]) -> None:
        check(len(layout) > 0 and all(c.role == "scale" and c.dtype == "int32" for c in layout),
              f"generator method {self.name} models int32 scale tokens; this dataset has "
              f"{', '.join(f'{c.name} ({c.role}, {c.dtype})' for c in layout)}")
        check(len({(c.size, c.vocab) for c in layout}) == 1,
              f"generator method {self.name} needs equal tokens and vocabularies per scale, got "
              f"{[(c.name, c.size, c.vocab) for c in layout]}")

    def model_config(self, params, layout: list[TokenColumn], num_classes: int) -> ARSITConfig:
        self.accept(layout)
        return ARSITConfig(num_scales=len(layout), tokens_per_scale=layout[0].size, codebook_size=layout[0].vocab,
                           num_classes=num_classes, **params.model_dump())

    def build(self, model_cfg: ARSITConfig):
        return build_generator(model_cfg)

    def loss(self, model, ids_BL, cond_B, tokenizer=None):
        cfg = unwrap(model).cfg
        logits = model(ids_BL, cond_B)  # (B, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids_BL.flatten(), reduction="none")  # (B·L,)
        per_scale = nll.detach().view(ids_BL.shape[0], cfg.num_scales, cfg.tokens_per_scale).mean((0, 2))  # (S,)
        return nll.mean(), {f"nll/scale_{s}": v for s, v in enumerate(per_scale)}

    def sample(self, generator, tokenizer, classes_B, settings, seed, stop=None, prefix=None):
        from coarse2fine.train.generate import generate

        return generate(generator, tokenizer, classes_B, stop, settings, seed, prefix)

    def upsample(self, generator, tokenizer, low_B3rr, classes_B, settings, seed):
        from coarse2fine.train.generate import upsample

        return upsample(generator, tokenizer, low_B3rr, classes_B, settings, seed)

    def edit(self, generator, tokenizer, image_B3RR, keep_scales, classes_B, settings, seed):
        """The edit and its kept scales decoded (both (B, 3, ·, ·)); the image is encoded once."""
        from coarse2fine.train.generate import decode, encode_prefix, generate

        prefix = encode_prefix(tokenizer, image_B3RR, keep_scales)  # (B, k·N)
        _, edited = generate(generator, tokenizer, classes_B, None, settings, seed, prefix)
        return edited, decode(tokenizer, prefix)

    def passes(self, model_cfg, settings):
        from coarse2fine.train.generate import forward_passes

        return {"forward_passes": forward_passes(model_cfg.num_scales * model_cfg.tokens_per_scale), "diffusion_passes": 0}

    def evaluate(self, pair, images_uri, cfg, settings, num_samples, seed):
        """SIT Tables 2 and 4 in miniature (``evaluate/generator_eval.py``): stop-scale rows where the
        tokenizer decodes partial sequences, else full-resolution samples block-averaged to the
        tokenizer's evaluation resolutions (the seed's baseline rows); upsampling rows where it
        encodes low resolutions; what does not apply is reported as such."""
        from coarse2fine.evaluate.generator_eval import evaluate_generator

        can = pair.supported()
        return evaluate_generator(pair.generator, pair.tokenizer, images_uri, cfg, settings, num_samples, seed,
                                  stop_scales="stop_scale" in can, upsampling="upsample" in can,
                                  baseline_resolutions=pair.tok_method.eval_resolutions(pair.tokenizer.cfg))
