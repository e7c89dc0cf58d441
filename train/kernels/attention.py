"""Block-causal attention over blocks of unequal token counts: SIT's scales (seed §4.1, the
scale-causal mask is block lower-triangular over scales) and CART's base and detail maps.

``block_causal_attention(q, k, v, sizes)``: token i of block b_i attends token j of block b_j iff
b_j <= b_i; ``sizes`` are the blocks' token counts (L = their sum). Two implementations behind it:

* the reference, any device: ``scaled_dot_product_attention`` with the dense (L, L) boolean mask,
  built once per (sizes, device) and cached;
* on CUDA (``kernels.use_kernel``) for sequences of at least ``FLEX_MIN_TOKENS``, FlexAttention: a
  ``BlockMask`` (cached the same way) lets the compiled kernel skip every tile that lies wholly
  above the block diagonal and drop the mask arithmetic in the tiles wholly below it. Its Triton
  templates tile the head dimension with ``tl.dot``, which needs at least 16 and a power of two:
  other head sizes take the reference.

Measured on an H100 in bf16, forward + backward (``benchmarks/bench_attention.py``, RESULTS.md,
"Block-causal attention: the FlexAttention threshold"): SDPA with the dense mask is faster up to
4096 tokens (FlexAttention 0.60× at SIT's 1280 tokens, 0.89× at CART's 1448, 0.93× / 0.57× / 0.75×
at 2048 / 3072 / 4096), FlexAttention from 5120 on (1.08× at SIT 512 px, 1.14× at 8192), the same
crossover as an earlier session's run (1.12× and 1.24× there). So ``FLEX_MIN_TOKENS`` = 5120, the
shortest length where FlexAttention measured faster (between 4096 and 5120 nothing was measured).
One row disagreed between the two runs: 80 tokens at batch 64 (SIT's demo layout), where
FlexAttention was 0.59–0.85× in the first and 1.83× in the second; the rule keeps SDPA there.

FlexAttention is compiled once (``torch.compile(flex_attention)``, the way torch documents it) on
first use; the CPU tests check the ``BlockMask`` path against the reference with the uncompiled
(forward-only on CPU) ``flex_attention``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from coarse2fine.train.kernels import use_kernel

FLEX_MIN_TOKENS = 5120


def block_causal_mask(tokens_per_block, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) bool, True where token i (block b_i) may attend token j (block b_j <= b_i); built once
    per (sizes, device) and shared, so callers must not modify it."""
    return _mask(tuple(int(n) for n in tokens_per_block), torch.device(device or "cpu"))


def block_causal_attention(q_BhLd: torch.Tensor, k_BhLd: torch.Tensor, v_BhLd: torch.Tensor,
                           sizes: tuple[int, ...]) -> torch.Tensor:
    """Attention output (B, nh, L, hs) under the block-causal mask of ``sizes`` (module docstring)."""
    assert q_BhLd.shape[-2] == sum(sizes), f"{q_BhLd.shape[-2]} tokens for blocks of {sum(sizes)}"
    L, hs = q_BhLd.shape[-2:]
    if use_kernel(q_BhLd, k_BhLd, v_BhLd) and L >= FLEX_MIN_TOKENS and hs >= 16 and hs & (hs - 1) == 0:
        return _compiled_flex()(q_BhLd, k_BhLd, v_BhLd, block_mask=flex_block_mask(sizes, q_BhLd.device))
    return F.scaled_dot_product_attention(q_BhLd, k_BhLd, v_BhLd, attn_mask=_mask(sizes, q_BhLd.device))


@functools.lru_cache(maxsize=64)
def _block_ids(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(L,) the block of each token."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


@functools.lru_cache(maxsize=64)
def _mask(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    block = _block_ids(sizes, device)  # (L,)
    return block[:, None] >= block[None, :]


@functools.lru_cache(maxsize=64)
def flex_block_mask(sizes: tuple[int, ...], device: torch.device):
    """FlexAttention's ``BlockMask`` of the block-causal rule (cached per sizes and device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    block = _block_ids(sizes, device)

    def may_attend(b, h, q_idx, kv_idx):
        return block[q_idx] >= block[kv_idx]

    L = sum(sizes)
    return create_block_mask(may_attend, None, None, L, L, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
