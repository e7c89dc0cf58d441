"""KL-regularised continuous autoencoder (the tokenizer of MAR and FAR: LDM's ``AutoencoderKL``,
which MAR's "kl16" VAE is) on the shared conv autoencoder (``conv_ae.py``).

The encoder emits 2·C channels, the mean and log-variance of a diagonal Gaussian posterior
(log-variance clamped to [−30, 20] as LDM's ``DiagonalGaussianDistribution``); training decodes a
posterior sample and adds ``kl_weight`` · KL(q ‖ N(0, I)) (summed over the latent, averaged over
the batch; LDM's weight 1e-6). No quantizer. The latent side is resolution / f (8×8 at 64 px,
f = 8: FAR's f = 16 at 256 px gives 16×16); C = 16 is MAR's ``vae_embed_dim``. LDM's and MAR's
perceptual and adversarial terms: see ``train/methods/kl.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.conv_ae import build_pair, check_shape

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp


@dataclass
class KLConfig:
    resolution: int = 64
    size: str = "tiny"
    downsample: int = 8  # f
    z_channels: int = 16  # C (MAR's vae_embed_dim)
    kl_weight: float = 1e-6  # LDM's kl_weight

    def __post_init__(self) -> None:
        check_shape(self.size, self.downsample, self.resolution)
        if self.z_channels < 1 or self.kl_weight < 0:
            raise ValueError("z_channels must be >= 1 and kl_weight >= 0")

    @property
    def latent_side(self) -> int:
        return self.resolution // self.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.z_channels, self.latent_side, self.latent_side)


class KLAutoencoder(nn.Module):
    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = build_pair(cfg.size, cfg.downsample, 2 * cfg.z_channels, cfg.z_channels)

    def encode(self, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] → posterior mean and log-variance, each (B, C, h, w)."""
        assert x_B3HW.shape[-1] == self.cfg.resolution, f"expects {self.cfg.resolution}px images"
        mean, logvar = self.encoder(x_B3HW * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Latents → image in [0, 1] (unclamped)."""
        return (self.decoder(z_BChw) + 1) / 2

    def forward(self, x_B3HW: torch.Tensor):
        """(reconstruction of a posterior sample (the mean in eval mode), posterior mean (B, C·h·w),
        {"aux": kl_weight · KL, "kl": KL})."""
        mean, logvar = self.encode(x_B3HW)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        return self.decode(z), mean.flatten(1), {"aux": self.cfg.kl_weight * kl, "kl": kl.detach()}


def build_kl(cfg: KLConfig) -> KLAutoencoder:
    return KLAutoencoder(cfg)
