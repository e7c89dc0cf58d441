"""CART's base-detail tokenizer (CART seed §3.1–3.2, Algorithms 1–2) as a method plug-in
(``tokenizer.method: cart``).

Reads ``images`` joined by key with ``decomposition`` (the Mumford–Shah bases B_1 … B_n, built by
preprocessing with ``preprocess.decomposition.order`` ≥ ``order``). Tokens: one int32 column per
token map in sequence order — ``base_{i}`` (role ``base``, maps of growing side) then
``detail_{k}_{j}`` (role ``detail``, full-side maps of D_k, D_n first) — all ids into one codebook,
whose vector dimension the layout records (``code_dim``) for the next-detail generator.
Objective (``train/tasks.py``): the seed's "compound loss" (eq. 6): L2 + VAR's VQ loss + the
perceptual term (``tokenizer.train.perceptual``, recorded on every run) + the project's hinge GAN
loss (``tokenizer.train.adversarial_weight``).
"""

from __future__ import annotations

import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train.methods.base import TokenizerMethod, params_section
from coarse2fine.train.methods.cq import CONV_CODE
from coarse2fine.train.models.cart import CARTConfig, build_cart


class CART(TokenizerMethod):
    name = "cart"
    summary = "base-detail VQ-VAE over the Mumford–Shah decomposition (CART seed §3.2); order 0 = VAR's tokenizer"
    config_cls = CARTConfig
    params = params_section(CARTConfig, ("resolution",), "CART tokenizer parameters (see train/models/cart.py).")
    code = ("train.methods.cart", "train.models.cart", "train.models.residual_vq") + CONV_CODE

    def model_config(self, params, resolution: int) -> CARTConfig:
        return CARTConfig(resolution=resolution, **params.model_dump())

    def build(self, model_cfg: CARTConfig):
        return build_cart(model_cfg)

    def factors(self, model_cfg: CARTConfig) -> int:
        return model_cfg.order

    def layout(self, model_cfg: CARTConfig) -> list[TokenColumn]:
        cols, depth = [], {}
        for i, (side, k) in enumerate(model_cfg.schedule):
            if k == 0:
                name, role = f"base_{i}", "base"
            else:
                depth[k] = depth.get(k, 0) + 1
                name, role = f"detail_{k}_{depth[k]}", "detail"
            cols.append(TokenColumn(name, (side, side), "int32", model_cfg.codebook_size, role, model_cfg.z_channels))
        return cols

    def describe(self, model_cfg: CARTConfig) -> str:
        return (f"order {model_cfg.order}, {len(model_cfg.base_scales)} base + "
                f"{model_cfg.order * model_cfg.detail_depth} detail maps, V={model_cfg.codebook_size}")

    @torch.no_grad()
    def encode(self, model, x_B3HW, bases=None):
        _, ids, _ = model.encode(x_B3HW, bases)
        return {c.name: i.to(torch.int32).cpu().numpy() for c, i in zip(self.layout(model.cfg), ids)}

    @torch.no_grad()
    def reconstruct(self, model, x_B3rr, bases=None):
        recon, ids_BL, _ = model(x_B3rr, bases)
        return recon.clamp(0, 1), ids_BL
