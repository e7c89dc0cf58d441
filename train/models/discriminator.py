"""Spectral-normalised patch discriminator for the optional adversarial loss.

Architecture of VQGAN's ``NLayerDiscriminator`` (PatchGAN: 4×4 convs, stride 2, LeakyReLU 0.2),
with spectral normalisation on every conv instead of batch norm — the SIT seed (§4.1) fixes
adversarial instability "by applying spectral normalization following Miyato et al.".
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [spectral_norm(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_out = channels * min(2 ** i, 8)
            mods += [spectral_norm(nn.Conv2d(c, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c = c_out
        mods += [spectral_norm(nn.Conv2d(c, 1, 3, 1, 1))]
        self.net = nn.Sequential(*mods)
        # moving averages of the mean logits on real and fake images (LeCam regularisation, losses.py)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w) of images in [0, 1]."""
        return self.net(x_B3HW * 2 - 1)
