"""Tokenizer losses.

Weights follow the seed (B.1): 1.0 L2 and 0.1 adversarial; the quantizer's commitment (0.25) and
entropy (0.002) terms live in its aux loss. The seed's 0.1 perceptual (LPIPS) term needs pretrained
VGG weights that cannot be loaded offline here, so it is not part of the loss; training records that
in MLflow (tag ``c2f.perceptual``).

Adversarial loss: hinge loss (VQGAN) on a spectral-normalised patch discriminator, switched on after
``adversarial_start`` steps as VQGAN does (``disc_start``) so the autoencoder first learns to
reconstruct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PERCEPTUAL_OFF = "perceptual (LPIPS) loss off: no pretrained VGG weights available offline"


@dataclass(frozen=True)
class LossWeights:
    l2: float = 1.0
    adversarial: float = 0.1
    adversarial_start: int = 0
    lecam: float = 0.0  # LeCam regularisation of the discriminator (CQ seed §3.2); 0 = off


def reconstruction_loss(recon_B3HW: torch.Tensor, x_B3HW: torch.Tensor) -> torch.Tensor:
    """L2 on the spatial image, i.e. after the IDWT of the decoder output (seed §4.1)."""
    return F.mse_loss(recon_B3HW, x_B3HW)


def generator_hinge(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def discriminator_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def lecam_regularizer(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
                      ema_fake: torch.Tensor, decay: float = 0.99) -> torch.Tensor:
    """LeCam regularisation (Tseng et al. 2021, as its official code): update the exponential moving
    averages of the discriminator's mean outputs on real and fake images in place (``decay`` 0.99),
    then ``mean(relu(D(real) − ema_fake)²) + mean(relu(ema_real − D(fake))²)``."""
    with torch.no_grad():
        ema_real.mul_(decay).add_((1 - decay) * logits_real.mean())
        ema_fake.mul_(decay).add_((1 - decay) * logits_fake.mean())
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
