"""Convolutional VQ tokenizers on the shared conv autoencoder (``conv_ae.py``): CQ's channel-wise
quantization (CQ seed §3.2) and its spatial-VQ baseline (Table 6a), differing only in the axis
that is quantized.

The encoder maps an image to Z (B, C, H1, W1) with H1 = H / f.
- ``axis="channel"`` (CQ): Z is flattened to C vectors of dimension H1·W1, each quantized to one of
  K codes of that dimension (eq. 2): C tokens per image, each a whole-image "visual word".
- ``axis="spatial"`` (VQGAN / LlamaGen): the H1·W1 vectors of dimension C are quantized (raster
  order), optionally through a ``code_dim``-dimensional codebook.
Images in [0, 1] are mapped to [-1, 1] for the encoder; the decoder output is mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.conv_ae import build_pair, check_shape
from coarse2fine.train.models.quantizer import EuclideanVQ


@dataclass
class ConvVQConfig:
    resolution: int = 64
    axis: str = "channel"  # "channel" (CQ) | "spatial" (baseline)
    size: str = "tiny"
    downsample: int = 8  # f (the seed's 16 at 256 px; 8 at 64 px keeps 8×8 latents)
    z_channels: int = 64  # C: CQ's number of tokens; the spatial baseline's vector dimension
    codebook_size: int = 1024  # K
    code_dim: int | None = None  # spatial only: a lower codebook dimension (LlamaGen's 8); None = C
    beta: float = 0.25

    def __post_init__(self) -> None:
        if self.axis not in ("channel", "spatial"):
            raise ValueError(f"axis must be channel or spatial, got {self.axis!r}")
        check_shape(self.size, self.downsample, self.resolution)
        if self.codebook_size < 2 or self.z_channels < 1 or (self.code_dim is not None and self.code_dim < 1):
            raise ValueError("codebook_size must be >= 2, z_channels and code_dim >= 1")
        if self.axis == "channel" and self.code_dim is not None:
            raise ValueError("code_dim applies to the spatial axis only (CQ's code dimension is H1·W1)")

    @property
    def latent_side(self) -> int:
        return self.resolution // self.downsample

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Tokens per image: C channel tokens, or an H1×W1 map."""
        return (self.z_channels,) if self.axis == "channel" else (self.latent_side, self.latent_side)

    @property
    def vector_dim(self) -> int:
        """Dimension of a quantized vector before any projection: H1·W1 (channel) or C (spatial)."""
        return self.latent_side ** 2 if self.axis == "channel" else self.z_channels


class ConvVQTokenizer(nn.Module):
    def __init__(self, cfg: ConvVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = build_pair(cfg.size, cfg.downsample, cfg.z_channels, cfg.z_channels)
        self.quantizer = EuclideanVQ(cfg.vector_dim, cfg.codebook_size, cfg.code_dim, cfg.beta)

    def to_vectors(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Z → the vectors the quantizer sees: (B, C, h·w) channel-wise or (B, h·w, C) spatial."""
        v = z_BChw.flatten(2)  # (B, C, h·w)
        return v if self.cfg.axis == "channel" else v.transpose(1, 2)

    def from_vectors(self, v_BND: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_vectors`: (B, C, h, w)."""
        h = self.cfg.latent_side
        v = v_BND if self.cfg.axis == "channel" else v_BND.transpose(1, 2)  # (B, C, h·w)
        return v.reshape(len(v), self.cfg.z_channels, h, h)

    def encode(self, x_B3HW: torch.Tensor):
        """Images in [0, 1] → (quantized vectors (B, N, D), indices (B, N), aux_loss)."""
        assert x_B3HW.shape[-1] == self.cfg.resolution, f"expects {self.cfg.resolution}px images"
        return self.quantizer(self.to_vectors(self.encoder(x_B3HW * 2 - 1)))

    def decode(self, quantized_BND: torch.Tensor) -> torch.Tensor:
        """Quantized vectors → image in [0, 1] (unclamped)."""
        return (self.decoder(self.from_vectors(quantized_BND)) + 1) / 2

    def decode_indices(self, indices_BN: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantizer.indices_to_codes(indices_BN))

    def forward(self, x_B3HW: torch.Tensor):
        """The tokenizer contract: (reconstruction (B, 3, H, W), indices (B, N), {"aux": quantizer loss})."""
        q, indices, aux = self.encode(x_B3HW)
        return self.decode(q), indices, {"aux": aux}


def build_conv_vq(cfg: ConvVQConfig) -> ConvVQTokenizer:
    return ConvVQTokenizer(cfg)
