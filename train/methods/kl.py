"""The continuous tokenizer of MAR and FAR (``tokenizer.method: kl``): a KL-regularised conv
autoencoder, no quantizer (``train/models/kl_ae.py``).

Tokens: two float16 columns, the posterior ``mean`` and ``logvar`` (C, h, w) (role ``latent``;
MAR caches the posterior moments the same way), and in the layout the latent normalisation scale
that generators multiply posterior samples by: 1 / std of posterior samples over (up to
``CALIBRATION_IMAGES``) training images, measured when the tokens are written — LDM's
``scale_factor`` rule, of which MAR's constant 0.2325 is the value for its kl16 VAE. Objective
(``train/tasks.py``): L2 + kl_weight · KL (+ the project's hinge adversarial loss when
``tokenizer.train.adversarial_weight`` > 0) + LDM's perceptual term (``tokenizer.train.perceptual``:
LPIPS when its VGG weights are available, else the offline Inception-stem distance; recorded on every run).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.data import load_split
from coarse2fine.train.methods.base import TokenizerMethod, params_section
from coarse2fine.train.methods.cq import CONV_CODE
from coarse2fine.train.models.kl_ae import KLConfig, build_kl

CALIBRATION_IMAGES = 512  # training images whose latents set the normalisation scale


class KL(TokenizerMethod):
    name = "kl"
    summary = "KL-regularised continuous conv autoencoder (MAR/FAR tokenizer); tokens are latent moments"
    config_cls = KLConfig
    params = params_section(KLConfig, ("resolution",), "KL autoencoder parameters (see train/models/kl_ae.py).")
    code = ("train.methods.kl", "train.models.kl_ae") + CONV_CODE

    def model_config(self, params, resolution: int) -> KLConfig:
        return KLConfig(resolution=resolution, **params.model_dump())

    def build(self, model_cfg: KLConfig):
        return build_kl(model_cfg)

    def layout(self, model_cfg: KLConfig) -> list[TokenColumn]:
        shape = model_cfg.latent_shape
        return [TokenColumn("mean", shape, "float16", 0, "latent"), TokenColumn("logvar", shape, "float16", 0, "latent")]

    def describe(self, model_cfg: KLConfig) -> str:
        return f"continuous {'×'.join(map(str, model_cfg.latent_shape))} latents"

    @torch.no_grad()
    def calibrate(self, model, layout: list[TokenColumn], images_uri: str) -> list[TokenColumn]:
        return [replace(c, scale=self.latent_scale(model, load_split(images_uri, "train", limit=CALIBRATION_IMAGES)))
                for c in layout]

    @torch.no_grad()
    def latent_scale(self, model, x_B3HW: torch.Tensor) -> float:
        """1 / std of posterior samples of ``x_B3HW`` (seeded: the same images give the same scale)."""
        mean, logvar = model.encode(x_B3HW.to(next(model.parameters()).device))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)).to(mean)
        return float(1 / (mean + noise * (0.5 * logvar).exp()).std())

    @torch.no_grad()
    def encode(self, model, x_B3HW, bases=None):
        mean, logvar = model.encode(x_B3HW)
        return {"mean": mean.half().cpu().numpy(), "logvar": logvar.half().cpu().numpy()}

    @torch.no_grad()
    def reconstruct(self, model, x_B3rr, bases=None):
        recon, mean_BN, _ = model(x_B3rr)  # eval mode: decodes the posterior mean
        return recon.clamp(0, 1), mean_BN
