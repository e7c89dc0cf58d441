"""MAR's transformer over continuous tokens (MAR ``models/mar.py``), shared by MAR and FAR (whose
official code is a fork of it): an MAE-style encoder/decoder that turns a (partly masked, or
low-passed) latent into one condition vector z per token for the diffusion head
(``diffusion.py``).

Tokens are the latent's h·w positions, each a C-vector (MAR's ``patch_size`` 1). From MAR:
``buffer_size`` leading slots that all hold the class embedding (64 in MAR for 256 tokens; 16 here
for 64 tokens, the same quarter), learned positions for encoder, decoder and diffusion
conditions, LayerNorm after the token projection, the encoder dropping masked tokens (the same
number per batch) and the decoder re-inserting a learned mask token; class dropout to a null class
for CFG (MAR's ``fake_latent``; here the null row of the class table). Not as MAR: attention and
projection dropout (0.1 in MAR) are off; pre-norm blocks are the project's ``AttentionBlock``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.blocks import AttentionBlock, init_weights
from coarse2fine.train.models.diffusion import DiffusionHead

# encoder and decoder each get ``depth`` blocks of width ``dim`` (MAR: mar_base 768/12/12 each)
MAR_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "depth": 1, "heads": 2, "head_width": 64, "head_depth": 2},
    "mini": {"dim": 128, "depth": 2, "heads": 4, "head_width": 256, "head_depth": 3},
    "small": {"dim": 384, "depth": 6, "heads": 6, "head_width": 512, "head_depth": 3},
    "mar-base": {"dim": 768, "depth": 12, "heads": 12, "head_width": 1024, "head_depth": 6},
}


@dataclass
class MARConfig:
    seq_len: int  # h·w tokens, from the tokens layout
    token_dim: int  # C, from the layout
    latent_scale: float  # multiplies the posterior sample to unit scale, from the layout (MAR's 0.2325)
    num_classes: int = 0
    level_cond: bool = False  # FAR: the diffusion head sees the frequency level
    size: str = "tiny"
    buffer_size: int = 16
    diffusion_batch_mul: int = 4  # MAR: diffusion samples per token in training
    diffusion_steps: int = 25  # DDIM steps per sampled token (MAR: 100 DDPM steps)
    cond_drop_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.size not in MAR_SIZES:
            raise ValueError(f"unknown generator size {self.size!r}; choose from {sorted(MAR_SIZES)}")
        if min(self.seq_len, self.token_dim, self.diffusion_batch_mul, self.diffusion_steps) < 1:
            raise ValueError("seq_len, token_dim, diffusion_batch_mul and diffusion_steps must be >= 1")
        if self.buffer_size < 1 or self.latent_scale <= 0 or self.num_classes < 0:
            raise ValueError("buffer_size must be >= 1, latent_scale > 0, num_classes >= 0")
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError("cond_drop_prob must be in [0, 1)")

    @property
    def null_class(self) -> int:
        return self.num_classes


class MAR(nn.Module):
    def __init__(self, cfg: MARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = MAR_SIZES[cfg.size]
        D, L, P = d["dim"], cfg.seq_len, cfg.buffer_size
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, D)  # last row = null class (CFG)
        self.z_proj = nn.Linear(cfg.token_dim, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.enc_pos = nn.Parameter(torch.randn(P + L, D) * 0.02)
        self.encoder = nn.ModuleList(AttentionBlock(D, d["heads"], 4.0, causal=False) for _ in range(d["depth"]))
        self.encoder_norm = nn.LayerNorm(D)
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.dec_pos = nn.Parameter(torch.randn(P + L, D) * 0.02)
        self.decoder = nn.ModuleList(AttentionBlock(D, d["heads"], 4.0, causal=False) for _ in range(d["depth"]))
        self.decoder_norm = nn.LayerNorm(D)
        self.diffusion_pos = nn.Parameter(torch.randn(L, D) * 0.02)
        self.head = DiffusionHead(cfg.token_dim, D, d["head_width"], d["head_depth"], cfg.level_cond)

    def forward(self, x_BLC: torch.Tensor, cond_B: torch.Tensor, mask_BL: torch.Tensor | None = None,
                target_BLC: torch.Tensor | None = None, level_B: torch.Tensor | None = None) -> torch.Tensor:
        """Conditions z (B, L, D) for every token, given the visible tokens (``mask_BL`` True =
        masked, the same count in every row; None = all visible, FAR) and the class. With
        ``target_BLC``: the diffusion loss per token (B, L) instead, averaged over
        ``diffusion_batch_mul`` draws of (t, noise) (MAR's ``forward_loss``; the head runs inside
        forward so that DDP sees every parameter), the head conditioned on ``level_B`` (FAR)."""
        z = self._conditions(x_BLC, cond_B, mask_BL)
        if target_BLC is None:
            return z
        mul, (B, L, C) = self.cfg.diffusion_batch_mul, target_BLC.shape
        level = None if level_B is None else level_B[:, None].expand(B, L).reshape(-1).repeat(mul)
        loss = self.head.loss(target_BLC.reshape(-1, C).repeat(mul, 1), z.reshape(B * L, -1).repeat(mul, 1), level)
        return loss.view(mul, B, L).mean(0)

    def _conditions(self, x_BLC: torch.Tensor, cond_B: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
        assert int(cond_B.min()) >= 0 and int(cond_B.max()) <= self.cfg.num_classes, "class id out of range"
        B, L, _ = x_BLC.shape
        P = self.cfg.buffer_size
        buf = self.cls_emb(cond_B)[:, None].expand(B, P, -1)  # (B, P, D)
        x = torch.cat([buf, self.z_proj(x_BLC)], dim=1) + self.enc_pos  # (B, P+L, D)
        x = self.z_proj_ln(x)
        keep = torch.ones(B, P + L, dtype=torch.bool, device=x.device)
        if mask_BL is not None:
            keep[:, P:] = ~mask_BL
        x = x[keep].view(B, -1, x.shape[-1])  # (B, P + visible, D): the encoder drops masked tokens
        for blk in self.encoder:
            x = blk(x)
        x = self.decoder_embed(self.encoder_norm(x))
        full = self.mask_token.expand(B, P + L, -1).clone()  # (B, P+L, D)
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.dec_pos
        for blk in self.decoder:
            x = blk(x)
        return self.decoder_norm(x)[:, P:] + self.diffusion_pos  # (B, L, D)


def build_mar(cfg: MARConfig) -> MAR:
    """The one builder: GPT-2 init of the transformer's linear and embedding layers (std 0.02); the
    diffusion head keeps MAR's own init."""
    model = MAR(cfg)
    head_state = {k: v.clone() for k, v in model.head.state_dict().items()}
    init_weights(model)
    model.head.load_state_dict(head_state)
    return model
