"""CQ (CQ seed §3.2): the channel-wise tokenizer as a method plug-in (``tokenizer.method: cq``).

Tokens: one int32 column ``ids`` of C channel tokens per image (role ``channel``), each an id into
a codebook of K vectors of dimension H1·W1. Objective (``train/tasks.py``): L2 + the codebook and
commitment loss (eq. 3) + the perceptual term (``tokenizer.train.perceptual``: LPIPS when its VGG
weights are available, else the offline Inception-stem distance; recorded on every run) + the
project's hinge adversarial loss after ``adversarial_start``, with LeCam regularisation of the
discriminator at ``tokenizer.train.lecam_weight`` (0.001 as MAGVIT-v2; the seed gives no weight).
Not as the seed: its StyleGAN discriminator is the project's spectral-norm PatchGAN. The seed trains with Adam, lr 1e-4 decayed by cosine to 5e-5
(§4.1, following SeQ-GAN); our schedule decays to 0 after a warm-up.
"""

from __future__ import annotations

import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.methods.base import TokenizerMethod, params_section
from coarse2fine.train.models.conv_vq import ConvVQConfig, build_conv_vq

CONV_CODE = ("train.models.conv_vq", "train.models.conv_ae", "train.models.quantizer", "train.models.discriminator",
             "train.losses")


class CQ(TokenizerMethod):
    name = "cq"
    summary = "channel-wise quantization: one token per feature channel, conv autoencoder (CQ seed §3.2)"
    config_cls = ConvVQConfig
    axis = "channel"
    params = params_section(ConvVQConfig, ("resolution", "axis", "code_dim"),
                            "CQ parameters (see train/models/conv_vq.py): z_channels = tokens per image.")
    code = ("train.methods.cq",) + CONV_CODE

    def model_config(self, params, resolution: int) -> ConvVQConfig:
        return ConvVQConfig(resolution=resolution, axis=self.axis, **params.model_dump())

    def build(self, model_cfg: ConvVQConfig):
        return build_conv_vq(model_cfg)

    def layout(self, model_cfg: ConvVQConfig) -> list[TokenColumn]:
        role = "channel" if model_cfg.axis == "channel" else "scale"  # a spatial map is one "scale"
        return [TokenColumn("ids", model_cfg.token_shape, "int32", model_cfg.codebook_size, role)]

    def describe(self, model_cfg: ConvVQConfig) -> str:
        return f"{model_cfg.axis} VQ, K={model_cfg.codebook_size}"

    @torch.no_grad()
    def encode(self, model, x_B3HW, bases=None):
        _, idx_BN, _ = model.encode(x_B3HW)
        return {"ids": idx_BN.to(torch.int32).reshape(len(x_B3HW), *model.cfg.token_shape).cpu().numpy()}

    @torch.no_grad()
    def reconstruct(self, model, x_B3rr, bases=None):
        recon, idx_BN, _ = model(x_B3rr)
        return recon.clamp(0, 1), idx_BN
