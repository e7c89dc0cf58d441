"""ViT-VQGAN (SIT seed §5.1 baseline, ``tokenizer.method: vit_vq``): SIT's transformer with one
"scale" of pixel patches, no DWT and one codebook. ``tokens_per_scale`` is its whole sequence
(the seed compares both at the same sequence length); tokens: one column ``ids_0`` (role ``scale``),
so AR-SIT over it is the Parti-style spatial baseline."""

from __future__ import annotations

from coarse2fine.train.methods.base import params_section
from coarse2fine.train.methods.sit import SIT, TOKENIZER_CODE
from coarse2fine.train.models.sit import SITConfig

SPATIAL = dict(num_scales=1, per_scale_codebooks=False, enc_per_scale_params=False, dec_per_scale_params=False,
               causal_encoder=False, causal_decoder=False)


class ViTVQ(SIT):
    name = "vit_vq"
    summary = "spatial ViT-VQGAN baseline: pixel patches, one codebook (SIT seed §5.1)"
    params = params_section(SITConfig, ("resolution", *SPATIAL),
                            "ViT-VQGAN parameters; tokens_per_scale = the whole sequence (a square number).")
    code = ("train.methods.sit", "train.methods.vit_vq") + TOKENIZER_CODE

    def model_config(self, params, resolution: int) -> SITConfig:
        return SITConfig(resolution=resolution, **SPATIAL, **params.model_dump())

    def describe(self, model_cfg: SITConfig) -> str:
        return "ViT-VQGAN"
