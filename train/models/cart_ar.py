"""CART's next-detail transformer (CART seed §3.3, eq. 13; Fig. 2b): a decoder-only transformer
that predicts every token of the next token map in parallel, maps of unequal sizes (the base's
multi-scale maps, then full-side detail maps) under a block-causal mask — each map attends to
itself and to every earlier map.

As VAR (the seed builds on it and gives no more detail): the input of map 0 is the class
embedding repeated over its positions plus a learned start position (VAR's ``sos`` +
``pos_start``); the input of map m ≥ 1 is the tokenizer's cumulative reconstruction f̂ of maps
< m, area-downsampled to map m's side (``CARTTokenizer.map_input``), through a linear
``word_embed``; every position adds a learned absolute position and a level (map) embedding; one
shared output head (one shared codebook). Classifier-free guidance as VAR: null class with
probability ``cond_drop_prob`` in training. Not as VAR: plain pre-norm blocks with the class as
the start map, not AdaLN (VAR's conditioning; the seed describes a GPT-2-like decoder); a constant
CFG scale over maps (VAR ramps it linearly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.kernels.attention import block_causal_mask
from coarse2fine.train.models.arsit import GENERATOR_SIZES
from coarse2fine.train.models.blocks import AttentionBlock, KVCache, init_weights


@dataclass
class CARTARConfig:
    map_sides: tuple[int, ...]  # side of every token map in order, from the tokens layout
    codebook_size: int  # V, from the layout
    code_dim: int  # C of the tokenizer's features (the inputs), from the layout
    num_classes: int = 0
    size: str = "tiny"  # arsit.GENERATOR_SIZES
    mlp_ratio: float = 4.0
    cond_drop_prob: float = 0.1

    def __post_init__(self) -> None:
        self.map_sides = tuple(int(s) for s in self.map_sides)
        if self.size not in GENERATOR_SIZES:
            raise ValueError(f"unknown generator size {self.size!r}; choose from {sorted(GENERATOR_SIZES)}")
        if not self.map_sides or min(self.map_sides) < 1 or self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("map_sides must be non-empty and positive, codebook_size >= 2, code_dim >= 1")
        if self.num_classes < 0 or not 0 <= self.cond_drop_prob < 1:
            raise ValueError("num_classes must be >= 0 and cond_drop_prob in [0, 1)")

    @property
    def map_sizes(self) -> list[int]:
        return [s * s for s in self.map_sides]

    @property
    def seq_len(self) -> int:
        return sum(self.map_sizes)

    @property
    def null_class(self) -> int:
        return self.num_classes


class CARTAR(nn.Module):
    def __init__(self, cfg: CARTARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = GENERATOR_SIZES[cfg.size]
        C, L, first = d["dim"], cfg.seq_len, cfg.map_sizes[0]
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row = null class (CFG)
        self.pos_start = nn.Parameter(torch.randn(first, C) * 0.02)
        self.word_embed = nn.Linear(cfg.code_dim, C)
        self.pos = nn.Parameter(torch.randn(L, C) * 0.02)
        self.lvl_emb = nn.Embedding(len(cfg.map_sides), C)
        self.blocks = nn.ModuleList(AttentionBlock(C, d["heads"], cfg.mlp_ratio) for _ in range(d["depth"]))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.codebook_size)
        level = torch.repeat_interleave(torch.arange(len(cfg.map_sides)), torch.tensor(cfg.map_sizes))
        self.register_buffer("level", level, persistent=False)  # (L,) map of each position
        starts = torch.tensor([0] + cfg.map_sizes).cumsum(0)
        self.register_buffer("starts", starts, persistent=False)  # (M+1,) first position of each map

    def _start_map(self, cond_B: torch.Tensor) -> torch.Tensor:
        """Map 0's input: the class embedding at each of its positions + the start positions (B, s0², C)."""
        assert int(cond_B.min()) >= 0 and int(cond_B.max()) <= self.cfg.num_classes, "class id out of range"
        return self.cls_emb(cond_B)[:, None] + self.pos_start

    def _trunk(self, x_BTC: torch.Tensor, first: int, cache: KVCache | None, mask: torch.Tensor | None = None,
               causal_sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """Logits of positions first … first+T−1; the attention rule is ``mask`` (cached sampling) or the
        block-causal ``causal_sizes`` (teacher forcing over the whole sequence)."""
        T = x_BTC.shape[1]
        x_BTC = x_BTC + self.pos[first: first + T] + self.lvl_emb(self.level[first: first + T])
        pos_T = torch.arange(first, first + T, device=x_BTC.device) if cache is not None else None
        for i, blk in enumerate(self.blocks):
            x_BTC = blk(x_BTC, cache, i, mask, causal_sizes, pos_T)
        if cache is not None:
            cache.length += T
        return self.head(self.ln_f(x_BTC))

    def forward(self, inputs_BTC: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) of every map given the inputs of maps 1 … M−1
        (``CARTTokenizer.teacher_inputs``, (B, L − s0², code_dim)) and the class."""
        x = torch.cat([self._start_map(cond_B), self.word_embed(inputs_BTC)], dim=1)  # (B, L, C)
        assert x.shape[1] == self.cfg.seq_len, f"inputs for {x.shape[1]} positions, model has {self.cfg.seq_len}"
        return self._trunk(x, 0, None, causal_sizes=tuple(self.cfg.map_sizes))

    def map_logits(self, m: int, input_BTC: torch.Tensor | None, cond_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, s_m², V) of map m, whose input is ``input_BTC`` (None for map 0), given the
        maps < m already in ``cache`` (KV-cached sampling: one call per map, in order)."""
        first = int(self.starts[m])
        assert cache.length == first, f"the cache holds {cache.length} positions, map {m} starts at {first}"
        x = self._start_map(cond_B) if m == 0 else self.word_embed(input_BTC)  # (B, s_m², C)
        T = x.shape[1]
        mask = block_causal_mask(self.cfg.map_sizes, x.device)[first: first + T]  # (T, L): maps <= m
        return self._trunk(x, first, cache, mask=mask)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache.for_layers(self.blocks, batch, self.cfg.seq_len, self.pos)


def build_cart_ar(cfg: CARTARConfig) -> CARTAR:
    """The one builder (GPT-2 init of linear and embedding layers, std 0.02)."""
    return init_weights(CARTAR(cfg))
