"""SIT (SIT seed §4.1): the spectral tokenizer as a method plug-in (``tokenizer.method: sit``).

Tokens: one int32 column ``ids_s`` per scale s (0 = the coarsest), each a grid×grid map of ids into
that scale's codebook (role ``scale``). Variants by the causal switches (seed §4.1, §5): SIT-SC
(both scale-causal: early-stop decoding and prefix encoding), SIT-SCE (encoder only: upsampling and
editing), SIT-SCD (decoder only: coarse-to-fine generation with early stop), dense SIT (neither).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.methods.base import TokenizerMethod, check, params_section
from coarse2fine.train.models.sit import SITConfig, build_tokenizer

TOKENIZER_CODE = ("train.models.sit", "train.models.blocks", "train.models.quantizer",
                  "train.kernels.haar", "train.models.discriminator", "train.losses")
MIN_EVAL_SIDE = 8  # px: the baseline's reconstruction table stops there (a 1-px image says nothing)


class SIT(TokenizerMethod):
    name = "sit"
    summary = "spectral image tokenizer: Haar DWT scales, per-scale codebooks (SIT seed §4.1)"
    config_cls = SITConfig
    params = params_section(SITConfig, ("resolution",), "SIT parameters (see train/models/sit.py).")
    code = ("train.methods.sit",) + TOKENIZER_CODE

    def model_config(self, params, resolution: int) -> SITConfig:
        return SITConfig(resolution=resolution, **params.model_dump())

    def build(self, model_cfg: SITConfig):
        return build_tokenizer(model_cfg)

    def layout(self, model_cfg: SITConfig) -> list[TokenColumn]:
        g = model_cfg.grid
        return [TokenColumn(f"ids_{s}", (g, g), "int32", model_cfg.codebook_size, "scale")
                for s in range(model_cfg.num_scales)]

    def capabilities(self, model_cfg: SITConfig) -> frozenset[str]:
        if model_cfg.num_scales == 1:
            return frozenset()
        return frozenset(cap for cap, causal in (("decode_prefix", model_cfg.causal_decoder),
                                                 ("encode_prefix", model_cfg.causal_encoder)) if causal)

    def describe(self, model_cfg: SITConfig) -> str:
        suffix = {(True, True): "-SC", (True, False): "-SCE", (False, True): "-SCD", (False, False): ""}
        return "SIT" + suffix[(model_cfg.causal_encoder, model_cfg.causal_decoder)]

    @torch.no_grad()
    def encode(self, model, x_B3HW, bases=None):
        _, idx_BSN, _ = model.encode(x_B3HW)
        g = model.cfg.grid
        ids = idx_BSN.to(torch.int32).reshape(len(x_B3HW), idx_BSN.shape[1], g, g).cpu().numpy()  # (B, S, g, g)
        return {c.name: ids[:, s] for s, c in enumerate(self.layout(model.cfg))}

    @torch.no_grad()
    def reconstruct(self, model, x_B3rr, bases=None):
        """A SIT-SC model (scale-causal encoder and decoder) encodes and decodes a low-resolution
        image natively with its first scales; any other model (the ViT-VQGAN baseline, dense SIT)
        gets the input upsampled (bilinear) to R and its output averaged back down, as the seed
        does for its baseline (§5.1)."""
        R, r = model.cfg.resolution, x_B3rr.shape[-1]
        if r == R or self.capabilities(model.cfg) >= {"decode_prefix", "encode_prefix"}:
            recon, idx, _ = model(x_B3rr)
            return recon.clamp(0, 1), idx
        up = F.interpolate(x_B3rr, size=(R, R), mode="bilinear", align_corners=False)
        recon, idx, _ = model(up)
        return F.avg_pool2d(recon.clamp(0, 1), R // r), idx

    def last_layer(self, model):
        """The per-scale output projections (together they produce every DWT coefficient)."""
        return [proj.weight for proj in model.patch_out]

    def check_input_side(self, model_cfg: SITConfig, side: int) -> None:
        """A scale-causal SIT encodes R/2^k natively (k < number of scales)."""
        k = (model_cfg.resolution // side).bit_length() - 1 if 0 < side <= model_cfg.resolution else -1
        check(k >= 0 and side << k == model_cfg.resolution and k < model_cfg.num_scales,
              f"a {side}px image is not this tokenizer's {model_cfg.resolution}px / 2^k, k < {model_cfg.num_scales}")

    def eval_resolutions(self, model_cfg: SITConfig) -> list[int]:
        """R, R/2, …: every resolution a multi-scale model has (the baseline gets the same list down
        to 8 px)."""
        R, S = model_cfg.resolution, model_cfg.num_scales
        levels = S if S > 1 else max(1, int(np.log2(R // MIN_EVAL_SIDE)) + 1)
        return [R >> k for k in range(levels) if (R >> k) >= MIN_EVAL_SIDE or k == 0]
