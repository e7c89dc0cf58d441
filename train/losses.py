"""Tokenizer losses (seed B.1 weights: 1.0 L2, 0.1 perceptual, 0.1 adversarial; the quantizer's
commitment 0.25 and entropy 0.002 live in the quantizer's aux loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    l2: float = 1.0
    perceptual: float = 0.1
    adversarial: float = 0.1


def reconstruction_loss(recon_B3HW: torch.Tensor, x_B3HW: torch.Tensor) -> torch.Tensor:
    """L2 on the spatial image, i.e. after the IDWT of the decoder output (seed §4.1)."""
    return F.mse_loss(recon_B3HW, x_B3HW)
