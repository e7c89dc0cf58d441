"""MaskGIT-style bidirectional transformer over one token sequence (CQ seed §3.3: masked
channel-wise prediction; Chang et al. 2022 for everything CQ leaves to MaskGIT).

Input: the token ids (B, L) where masked positions hold ``mask_id`` = K (one extra embedding row),
preceded by a class token (row ``num_classes`` = the null class for classifier-free guidance,
dropped at ``cond_drop_prob`` in training). Learned absolute positions, pre-norm layers with
full (bidirectional) self-attention; queries and keys are RMS-normalised per head (QK-norm, as the
issue asks for bf16 stability; not in MaskGIT). Output: logits over the K codes at every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.blocks import AttentionBlock, init_weights

MASKGIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "depth": 2, "heads": 2},
    "mini": {"dim": 128, "depth": 4, "heads": 4},
    "small": {"dim": 512, "depth": 8, "heads": 8},
    "base": {"dim": 768, "depth": 24, "heads": 16},  # CQ's 305M "B" model is 24 layers of 1024; MaskGIT's is 24×768
}


@dataclass
class MaskGITConfig:
    seq_len: int  # L, from the tokens layout
    codebook_size: int  # K, from the tokens layout
    num_classes: int = 0
    size: str = "tiny"
    mlp_ratio: float = 4.0
    cond_drop_prob: float = 0.1  # CQ/MaskGIT class-conditional practice: 10% null class

    def __post_init__(self) -> None:
        if self.size not in MASKGIT_SIZES:
            raise ValueError(f"unknown maskgit size {self.size!r}; choose from {sorted(MASKGIT_SIZES)}")
        if self.seq_len < 1 or self.codebook_size < 2 or self.num_classes < 0:
            raise ValueError("seq_len must be >= 1, codebook_size >= 2, num_classes >= 0")
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError("cond_drop_prob must be in [0, 1)")

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.num_classes


class MaskGIT(nn.Module):
    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = MASKGIT_SIZES[cfg.size]
        C = d["dim"]
        self.tok_emb = nn.Embedding(cfg.codebook_size + 1, C)  # last row = [MASK]
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row = null class (CFG)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len + 1, C) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(C, d["heads"], cfg.mlp_ratio, causal=False, qk_norm=True)
                                    for _ in range(d["depth"]))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.codebook_size)

    def forward(self, ids_BL: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, K) at every position of a partly masked sequence (mask = ``mask_id``)."""
        assert ids_BL.shape[1] == self.cfg.seq_len, f"sequence of {ids_BL.shape[1]} tokens, model has {self.cfg.seq_len}"
        assert int(cond_B.min()) >= 0 and int(cond_B.max()) <= self.cfg.num_classes, "class id out of range"
        x = torch.cat([self.cls_emb(cond_B)[:, None], self.tok_emb(ids_BL)], dim=1) + self.pos  # (B, 1+L, C)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x[:, 1:]))


def cosine_mask_ratio(r: torch.Tensor | float) -> torch.Tensor | float:
    """MaskGIT's cosine schedule γ(r) = cos(π r / 2): the share of tokens masked at progress r ∈ [0, 1]."""
    return torch.cos(r * math.pi / 2) if isinstance(r, torch.Tensor) else math.cos(r * math.pi / 2)


def build_maskgit(cfg: MaskGITConfig) -> MaskGIT:
    """The one builder (weights: BERT/MaskGIT init of linear and embedding layers, std 0.02)."""
    return init_weights(MaskGIT(cfg))
