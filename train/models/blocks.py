"""Shared transformer blocks: grouped layers whose parameters can be shared across scales or
specialised per scale (SIT), block-causal masks for blocks of any sizes, and the causal decoder
layer with a key/value cache (AR-SIT; any autoregressive generator).

SIT (seed §4.1, "different transformer parameters per scale"): the query/key/value embeddings,
the layer norms and the MLP of each layer have one set of weights per scale; the attention output
projection is shared (the seed does not list it). With ``groups=1`` every op is an ordinary
shared-weight transformer (ViT-VQGAN). Activations are ``x_BLC`` with ``L = S·N`` tokens, scale
major; grouped ops view them as ``(B, S, N, C)``.

Attention is ``scaled_dot_product_attention``, or under a block-causal mask (the scale-causal mask is
block lower-triangular over scales, seed §4.1) ``kernels.attention.block_causal_attention``: FlexAttention
on CUDA, SDPA with a cached boolean mask elsewhere.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from coarse2fine.train.kernels.attention import block_causal_attention


def _grouped(x_BLC: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, L, C) → (B, G', L/G', C) where G' = number of scales present (or 1 when shared)."""
    if groups == 1:
        return x_BLC.unsqueeze(1)  # (B, 1, L, C)
    assert x_BLC.shape[1] % groups == 0, "sequence length not divisible by the number of scales"
    return x_BLC.view(x_BLC.shape[0], groups, x_BLC.shape[1] // groups, x_BLC.shape[2])


class GroupLinear(nn.Module):
    """A linear layer with one weight per group (scale); input (B, G', T, in), G' <= G."""

    def __init__(self, groups: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(groups, d_out))
        bound = 1 / math.sqrt(d_in)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_BGTI: torch.Tensor) -> torch.Tensor:
        g = x_BGTI.shape[1]
        assert g <= self.weight.shape[0], f"{g} groups for a layer with {self.weight.shape[0]}"
        return torch.einsum("bgti,gio->bgto", x_BGTI, self.weight[:g]) + self.bias[:g, None, :]


class GroupLayerNorm(nn.Module):
    """LayerNorm with one affine (weight, bias) per group."""

    def __init__(self, groups: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, dim))
        self.bias = nn.Parameter(torch.zeros(groups, dim))
        self.eps = eps

    def forward(self, x_BGTC: torch.Tensor) -> torch.Tensor:
        g = x_BGTC.shape[1]
        y = F.layer_norm(x_BGTC, x_BGTC.shape[-1:], eps=self.eps)
        return y * self.weight[:g, None, :] + self.bias[:g, None, :]


class Block(nn.Module):
    """Pre-norm transformer layer (ViT / ViT-VQGAN): LN → attention → residual, LN → MLP → residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, groups: int) -> None:
        super().__init__()
        assert dim % heads == 0, "dim must be divisible by heads"
        self.heads, self.groups = heads, groups
        hidden = int(dim * mlp_ratio)
        self.ln1, self.ln2 = GroupLayerNorm(groups, dim), GroupLayerNorm(groups, dim)
        self.qkv = GroupLinear(groups, dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = GroupLinear(groups, dim, hidden), GroupLinear(groups, hidden, dim)

    def forward(self, x_BLC: torch.Tensor, num_scales: int, causal_sizes: tuple[int, ...] | None) -> torch.Tensor:
        """``causal_sizes``: token counts of the blocks of a block-causal mask, or None (full attention)."""
        B, L, C = x_BLC.shape
        g = num_scales if self.groups > 1 else 1

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return _grouped(t, g)

        qkv = self.qkv(self.ln1(grouped(x_BLC))).reshape(B, L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, L, hs)
        if causal_sizes is None:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs)
        else:
            y = block_causal_attention(q, k, v, causal_sizes)  # (B, nh, L, hs)
        x_BLC = x_BLC + self.proj(y.transpose(1, 2).reshape(B, L, C))
        h = self.fc2(F.gelu(self.fc1(self.ln2(grouped(x_BLC)))))  # (B, G', T, C)
        return x_BLC + h.reshape(B, L, C)


class Transformer(nn.Module):
    """A stack of :class:`Block` with a final (grouped) LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, groups: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, groups) for _ in range(depth))
        self.ln = GroupLayerNorm(groups, dim)
        self.groups = groups

    def forward(self, x_BLC: torch.Tensor, num_scales: int, causal_sizes: tuple[int, ...] | None) -> torch.Tensor:
        for blk in self.blocks:
            x_BLC = blk(x_BLC, num_scales, causal_sizes)
        g = num_scales if self.groups > 1 else 1
        return self.ln(_grouped(x_BLC, g)).reshape(x_BLC.shape)


class KVCache:
    """Preallocated keys/values of every layer for ``max_len`` input positions (gpt-fast's static
    cache): each call writes its keys and values in place at its positions, and attention reads the
    whole buffer under a mask, so a one-token step has the same shapes at every position and can be
    captured by a CUDA graph (``sampling.sample_tokens``). ``length`` = positions written so far,
    kept by the callers (a captured step must not change Python state)."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.k_LBhMd = torch.zeros(depth, batch, heads, max_len, head_size, dtype=dtype, device=device)
        self.v_LBhMd = torch.zeros_like(self.k_LBhMd)
        self.length = 0

    @classmethod
    def for_layers(cls, blocks: nn.ModuleList, batch: int, max_len: int, like: torch.Tensor) -> KVCache:
        """A cache for these ``AttentionBlock`` layers, in ``like``'s dtype and device."""
        heads = blocks[0].heads
        return cls(len(blocks), batch, heads, max_len, blocks[0].qkv.in_features // heads, like.dtype, like.device)

    @property
    def max_len(self) -> int:
        return self.k_LBhMd.shape[3]

    def write(self, layer: int, pos_T: torch.Tensor, k_BhTd: torch.Tensor, v_BhTd: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys/values of positions ``pos_T``; returns the layer's whole buffers (B, nh, max_len, hs)."""
        self.k_LBhMd[layer].index_copy_(2, pos_T, k_BhTd.to(self.k_LBhMd.dtype))
        self.v_LBhMd[layer].index_copy_(2, pos_T, v_BhTd.to(self.v_LBhMd.dtype))
        return self.k_LBhMd[layer], self.v_LBhMd[layer]


class AttentionBlock(nn.Module):
    """Pre-norm layer: LN → self-attention → residual, LN → MLP → residual. ``causal`` (AR, with an
    optional KV cache) or bidirectional (masked generation); ``qk_norm`` RMS-normalises queries and
    keys per head (QK-norm)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool = True, qk_norm: bool = False) -> None:
        super().__init__()
        assert dim % heads == 0, "dim must be divisible by heads"
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, causal_sizes: tuple[int, ...] | None = None,
                pos_T: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (T, keys) bool, True = may attend, replaces the token-causal rule (CART's
        block-causal maps); with a cache its keys are the cache's ``max_len`` positions. Without a
        cache, ``causal_sizes`` (the blocks' token counts) gives the block-causal rule instead, served
        by ``block_causal_attention``. With a cache, ``pos_T`` are the input positions of the T new
        tokens (a tensor, so a captured step can take a new position each replay)."""
        B, T, C = x_BTC.shape
        qkv = self.qkv(self.ln1(x_BTC)).reshape(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        q, k = self.q_norm(q), self.k_norm(k)
        assert self.causal or cache is None, "a KV cache serves causal attention only"
        if cache is not None:
            assert pos_T is not None and causal_sizes is None, "a cached call needs its positions"
            k, v = cache.write(layer, pos_T, k, v)  # (B, nh, max_len, hs)
            if mask is None:  # new queries at positions pos_T see keys 0..their own position
                mask = torch.arange(cache.max_len, device=x_BTC.device)[None, :] <= pos_T[:, None]  # (T, max_len)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        elif causal_sizes is not None:
            assert mask is None, "causal_sizes replaces the mask"
            y = block_causal_attention(q, k, v, causal_sizes)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x_BTC = x_BTC + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x_BTC + self.mlp(self.ln2(x_BTC))


def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2 / BERT initialisation: linear and embedding weights N(0, std²), linear biases 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
