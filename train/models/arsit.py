"""AR-SIT: the coarse-to-fine autoregressive transformer over SIT tokens (SIT seed §4.2, §5.3, B.2).

The sequence is the tokenizer's ids, scale 1 (coarsest) first, raster order inside a scale; eq. 6:
token n of scale s is predicted from all tokens of scales < s and tokens < n of scale s. Because
every scale has its own codebook, the same id means different things at different scales, so the
model has one token-embedding table and one output head per scale (§4.2).

Conditioning follows the class-conditional practice of LlamaGen/VAR rather than Parti's text
encoder (the seed conditions on captions through cross-attention; class labels are what our data
carries): a learned class embedding is the first input position ("start token"), index
``num_classes`` is the null class used for classifier-free guidance, and training replaces the
label by the null class with probability ``cond_drop_prob`` (0.1, as Parti/LlamaGen). Conditioning
enters only through :meth:`ARSIT.condition` (the start-token embedding, one position). The seed's
text path is not implemented; it would add a cross-attention sub-layer to ``blocks.AttentionBlock``
over caption embeddings (Parti), computed once per sample and kept beside the KV cache, with the
start token then a learned BOS; the token positions, heads and cache stay as they are.

Architecture: decoder-only pre-norm GPT (nanoGPT layout) with learnable absolute positions and a
key/value cache for sampling. Sizes: a DiT-style dict; ``parti-350m`` is the seed's B.2 generator
(1024 dims, 16 heads, 4096 hidden = ratio 4; the seed's 12 decoder layers — its 12 text-encoder
layers have no class-conditional counterpart, see above).

Positions: input position 0 is the condition, input position i ≥ 1 is token i-1; the output at
position i predicts token i. So a model that has seen ``t`` inputs predicts token ``t-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.blocks import AttentionBlock, KVCache, init_weights

GENERATOR_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "depth": 2, "heads": 2},
    "mini": {"dim": 128, "depth": 4, "heads": 4},
    "small": {"dim": 512, "depth": 8, "heads": 8},
    "parti-350m": {"dim": 1024, "depth": 12, "heads": 16},
}


@dataclass
class ARSITConfig:
    num_scales: int  # S, from the tokenizer
    tokens_per_scale: int  # N, from the tokenizer
    codebook_size: int  # V, from the tokenizer (per scale)
    num_classes: int = 0  # 0 = unconditional (only the null class)
    size: str = "tiny"
    mlp_ratio: float = 4.0
    cond_drop_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.size not in GENERATOR_SIZES:
            raise ValueError(f"unknown generator size {self.size!r}; choose from {sorted(GENERATOR_SIZES)}")
        if min(self.num_scales, self.tokens_per_scale, self.codebook_size) < 1 or self.num_classes < 0:
            raise ValueError("num_scales, tokens_per_scale, codebook_size must be >= 1, num_classes >= 0")
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError("cond_drop_prob must be in [0, 1)")

    @property
    def seq_len(self) -> int:
        return self.num_scales * self.tokens_per_scale

    @property
    def null_class(self) -> int:
        return self.num_classes


class ARSIT(nn.Module):
    def __init__(self, cfg: ARSITConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = GENERATOR_SIZES[cfg.size]
        S, V, C = cfg.num_scales, cfg.codebook_size, d["dim"]
        self.tok_emb = nn.Embedding(S * V, C)  # scale s uses rows s·V … s·V + V - 1 (§4.2)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row = null class (CFG)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, C) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(C, d["heads"], cfg.mlp_ratio) for _ in range(d["depth"]))
        self.ln_f = nn.LayerNorm(C)
        self.head_w = nn.Parameter(torch.randn(S, C, V) / math.sqrt(C))  # one logit layer per scale (§4.2)
        self.head_b = nn.Parameter(torch.zeros(S, V))
        self.register_buffer("_offsets", torch.arange(S) * V, persistent=False)

    def condition(self, cond_B: torch.Tensor) -> torch.Tensor:
        """Class ids (``num_classes`` = null) → the conditioning prefix (B, P=1, C)."""
        assert int(cond_B.min()) >= 0 and int(cond_B.max()) <= self.cfg.num_classes, "class id out of range"
        return self.cls_emb(cond_B)[:, None]

    def _embed_tokens(self, ids_BT: torch.Tensor, tok_pos_T: torch.Tensor) -> torch.Tensor:
        """Embeddings of the tokens at sequence positions ``tok_pos_T`` with their scales' tables (B, T, C)."""
        return self.tok_emb(ids_BT + self._offsets[tok_pos_T // self.cfg.tokens_per_scale])

    def _trunk(self, x_BTC: torch.Tensor, pos_T: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The decoder over inputs at positions ``pos_T`` (with a cache: after the positions it holds)."""
        # uncached calls start at 0: a slice, whose backward is cheaper than a gather's
        x_BTC = x_BTC + (self.pos[pos_T] if cache is not None else self.pos[: x_BTC.shape[1]])
        for i, blk in enumerate(self.blocks):
            x_BTC = blk(x_BTC, cache, i, pos_T=pos_T)
        return self.ln_f(x_BTC)

    def _logits(self, h_BTC: torch.Tensor, first: int) -> torch.Tensor:
        """Per-scale heads for outputs predicting tokens ``first … first+T-1`` → (B, T, V)."""
        N, T = self.cfg.tokens_per_scale, h_BTC.shape[1]
        out, t = [], 0
        while t < T:
            s = (first + t) // N
            n = min(T - t, (s + 1) * N - first - t)  # outputs left in scale s
            out.append(h_BTC[:, t: t + n] @ self.head_w[s] + self.head_b[s])
            t += n
        return torch.cat(out, dim=1)

    def forward(self, ids_BT: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) of tokens 0…T-1 given the condition and tokens < t."""
        B, T = ids_BT.shape
        assert T <= self.cfg.seq_len, f"sequence of {T} tokens, model has {self.cfg.seq_len}"
        pos_T = torch.arange(T, device=ids_BT.device)
        x = torch.cat([self.condition(cond_B), self._embed_tokens(ids_BT[:, : T - 1], pos_T[: T - 1])], dim=1)  # (B, T, C)
        return self._logits(self._trunk(x, pos_T, None), 0)

    def next_logits(self, ids_Bt: torch.Tensor, cond_B: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, V) of token t = ``ids_Bt.shape[1]``. With a cache, only inputs it has not seen
        are run (the whole prefix on the first call, then one token per call)."""
        t = ids_Bt.shape[1]
        assert t < self.cfg.seq_len, "the sequence is complete"
        start = cache.length if cache is not None else 0
        parts, seen = [], max(start, 1)
        if start == 0:
            parts.append(self.condition(cond_B))
        if t >= seen:  # input position i holds token i-1
            parts.append(self._embed_tokens(ids_Bt[:, seen - 1: t], torch.arange(seen - 1, t, device=ids_Bt.device)))
        x = torch.cat(parts, dim=1)  # (B, T, C)
        h = self._trunk(x, torch.arange(start, start + x.shape[1], device=x.device), cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self._logits(h[:, -1:], t)[:, 0]

    def decode_step(self, last_B1: torch.Tensor, pos_1: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One cached step with tensor inputs only: token ``pos - 1`` (``last_B1``) at input position
        ``pos_1`` (≥ 1) → logits (B, V) of token ``pos``. Shapes do not depend on the position and
        nothing leaves the device, so ``sampling`` can capture it in a CUDA graph; the caller keeps
        ``cache.length``."""
        h = self._trunk(self._embed_tokens(last_B1, pos_1 - 1), pos_1, cache)  # (B, 1, C)
        s_1 = pos_1 // self.cfg.tokens_per_scale  # the scale of the predicted token: its head (§4.2)
        return (h @ self.head_w[s_1] + self.head_b[s_1])[:, 0]  # (B, 1, C) @ (1, C, V) → (B, V)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A static cache for ``max_len`` input positions (default: the whole sequence; sampling
        that stops after scale s needs only its s·N, and attends over no more)."""
        return KVCache.for_layers(self.blocks, batch, max_len or self.cfg.seq_len, self.pos)


def build_generator(cfg: ARSITConfig) -> ARSIT:
    """The one builder (weights: GPT-2/nanoGPT init of linear and embedding layers, std 0.02)."""
    return init_weights(ARSIT(cfg))
