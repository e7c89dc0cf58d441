"""Convolutional encoder/decoder of VQGAN (taming-transformers' ``Encoder``/``Decoder``) without
attention blocks, as the CQ seed (§3.2, §4.1) uses it; shared by every conv tokenizer (CQ, its
spatial-VQ baseline, and later CART and the continuous tokenizer).

Layout as VQGAN: ``conv_in`` → per level ``res_blocks`` ResNet blocks (GroupNorm, SiLU, 3×3 conv)
then a stride-2 downsample (none after the last level) → middle ResNet blocks (VQGAN's middle
attention block is left out, per CQ) → GroupNorm, SiLU, ``conv_out`` to ``z_channels``. The decoder
mirrors it with nearest ×2 upsampling. The downsampling factor is ``2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUPS = 32  # VQGAN's GroupNorm groups (fewer when a tiny width is not divisible by 32)
# DiT-style named widths; VQGAN's f16 channel multipliers (1, 1, 2, 2, 4), the first log2(f)+1 of them.
CONV_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"ch": 16, "res_blocks": 1},
    "mini": {"ch": 32, "res_blocks": 1},
    "small": {"ch": 64, "res_blocks": 2},
    "base": {"ch": 128, "res_blocks": 2},  # VQGAN's width
}
CH_MULT = (1, 1, 2, 2, 4)


def check_shape(size: str, downsample: int, resolution: int) -> None:
    """ValueError unless ``size`` is named and ``downsample`` (f) is a power of two this
    autoencoder reaches that divides ``resolution``."""
    if size not in CONV_SIZES:
        raise ValueError(f"unknown conv size {size!r}; choose from {sorted(CONV_SIZES)}")
    levels = int(math.log2(downsample)) + 1 if downsample >= 1 else 0
    if levels < 1 or 2 ** (levels - 1) != downsample or levels > len(CH_MULT):
        raise ValueError(f"downsample must be a power of two up to {2 ** (len(CH_MULT) - 1)}, got {downsample}")
    if resolution % downsample:
        raise ValueError(f"resolution {resolution} is not divisible by downsample {downsample}")


def build_pair(size: str, downsample: int, z_out: int, z_in: int) -> tuple["Encoder", "Decoder"]:
    """The encoder (→ ``z_out`` channels) and decoder (``z_in`` channels →) of a named size and f."""
    widths = CONV_SIZES[size]
    ch_mult = CH_MULT[: int(math.log2(downsample)) + 1]
    return (Encoder(widths["ch"], ch_mult, widths["res_blocks"], z_out),
            Decoder(widths["ch"], ch_mult, widths["res_blocks"], z_in))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x_BCHW) + h


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] → (B, z_channels, H/f, W/f)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], res_blocks: int, z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        layers: list[nn.Module] = []
        c = ch
        for i, m in enumerate(ch_mult):
            for _ in range(res_blocks):
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i < len(ch_mult) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # VQGAN pads (0,1,0,1); same output size
        layers += [ResBlock(c, c), ResBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, z_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv_in(x_B3HW))


class Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, 3, h·f, w·f), unbounded (the tokenizer maps it back to [0, 1])."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], res_blocks: int, z_channels: int) -> None:
        super().__init__()
        c = ch * ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, c, 3, padding=1), ResBlock(c, c), ResBlock(c, c)]
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(res_blocks + 1):  # VQGAN's decoder has one more block per level
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self.body(z_BChw)
