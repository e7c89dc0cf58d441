"""Spectral Image Tokenizer (SIT, seed §4.1) and its spatial baseline ViT-VQGAN, one builder.

SIT: Haar DWT of the image → per-scale patchifiers giving N tokens per scale (scale 1 = the
approximation, 3-channel patches; scale s > 1 = the H|V|D details of one level, 9-channel patches
that grow ×2 per scale, Fig. 2) → learnable positions → transformer encoder → per-scale quantizer →
transformer decoder → per-scale output projections → IDWT. Switches (``SITConfig``): number of scales,
tokens per scale, per-scale codebooks, per-scale transformer parameters of the encoder and of the
decoder (seed Table 5 ablates them separately; SIT-SCD shares the decoder's, §5.3), scale-causal
encoder and/or decoder (SIT-SC = both, SIT-SCE, SIT-SCD).

ViT-VQGAN baseline = the same model with one "scale" and no DWT: pixel patches, one codebook.

Value range: images in [0, 1] are mapped to [-1, 1] before the DWT. A SIT-SC model trained at
resolution R encodes an image of resolution R/2^k natively with its first S-k scales: for the
orthonormal Haar transform the first scales of an image equal 2^k × the DWT of its 2^k-block
average, so low-resolution inputs are scaled by 2^k on the way in and 2^-k on the way out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.blocks import Transformer, _grouped
from coarse2fine.train.kernels.haar import haar_dwt, haar_idwt
from coarse2fine.train.models.quantizer import FactorizedVQ

# DiT-style named sizes (ViT-VQGAN's small/base/large, seed B.1/B.2); "tiny" for tests on CPU.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "depth": 1, "heads": 2},
    "mini": {"dim": 64, "depth": 2, "heads": 4},
    "small": {"dim": 512, "depth": 8, "heads": 8},
    "base": {"dim": 768, "depth": 12, "heads": 12},
    "large": {"dim": 1280, "depth": 32, "heads": 16},
}


@dataclass
class SITConfig:
    resolution: int = 64
    num_scales: int = 3  # S = DWT levels + 1; 1 = ViT-VQGAN baseline (pixel patches)
    tokens_per_scale: int = 16  # N, a square number
    size: str = "tiny"
    dec_size: str | None = None  # decoder size, default = size
    mlp_ratio: float = 4.0
    codebook_size: int = 1024
    code_dim: int = 32
    per_scale_codebooks: bool = True
    enc_per_scale_params: bool = True  # per-scale qkv, layer norms, MLP in the encoder (seed §4.1)
    dec_per_scale_params: bool = True  # … in the decoder; SIT-SCD shares them to save memory (§5.3)
    causal_encoder: bool = True
    causal_decoder: bool = True
    beta: float = 0.25
    entropy_weight: float = 0.002
    entropy_temperature: float = 0.01

    def __post_init__(self) -> None:
        g = math.isqrt(self.tokens_per_scale)
        if g * g != self.tokens_per_scale:
            raise ValueError(f"tokens_per_scale must be a square number, got {self.tokens_per_scale}")
        for s in (self.size, self.dec_size or self.size):
            if s not in MODEL_SIZES:
                raise ValueError(f"unknown model size {s!r}; choose from {sorted(MODEL_SIZES)}")
        if self.num_scales < 1:
            raise ValueError("num_scales must be >= 1")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("codebook_size must be >= 2 and code_dim >= 1")
        coarsest = self.resolution >> (self.num_scales - 1)
        if coarsest % g or coarsest << (self.num_scales - 1) != self.resolution:
            raise ValueError(f"resolution {self.resolution} with {self.num_scales} scales gives a coarsest "
                             f"scale of {coarsest}px, not divisible into a {g}x{g} token grid")

    @property
    def levels(self) -> int:
        return self.num_scales - 1

    @property
    def grid(self) -> int:
        return math.isqrt(self.tokens_per_scale)

    def scale_shape(self, s: int) -> tuple[int, int]:
        """(channels, side) of the coefficients of scale s (0-based)."""
        side = self.resolution >> (self.levels - max(s - 1, 0)) if s > 0 else self.resolution >> self.levels
        return (3 if s == 0 else 9), side

    def patch_dim(self, s: int) -> int:
        c, side = self.scale_shape(s)
        return c * (side // self.grid) ** 2


def patchify(coef_BCHW: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) → (B, grid², C·p·p) with p = H / grid, patches in raster order."""
    B, C, H, W = coef_BCHW.shape
    p = H // grid
    x = coef_BCHW.reshape(B, C, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
    return x.reshape(B, grid * grid, C * p * p)


def unpatchify(x_BNP: torch.Tensor, channels: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    B, N, P = x_BNP.shape
    p = math.isqrt(P // channels)
    x = x_BNP.reshape(B, grid, grid, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
    return x.reshape(B, channels, grid * p, grid * p)


class SpectralTokenizer(nn.Module):
    def __init__(self, cfg: SITConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc, dec = MODEL_SIZES[cfg.size], MODEL_SIZES[cfg.dec_size or cfg.size]
        S, N = cfg.num_scales, cfg.tokens_per_scale
        self.patch_in = nn.ModuleList(nn.Linear(cfg.patch_dim(s), enc["dim"]) for s in range(S))
        self.pos_enc = nn.Parameter(torch.randn(S * N, enc["dim"]) * 0.02)
        self.encoder = Transformer(enc["dim"], enc["depth"], enc["heads"], cfg.mlp_ratio,
                                   S if cfg.enc_per_scale_params else 1)
        self.quantizer = FactorizedVQ(enc["dim"], cfg.codebook_size, cfg.code_dim,
                                      S if cfg.per_scale_codebooks else 1, cfg.beta,
                                      cfg.entropy_weight, cfg.entropy_temperature)
        self.to_dec = nn.Linear(enc["dim"], dec["dim"]) if enc["dim"] != dec["dim"] else nn.Identity()
        self.pos_dec = nn.Parameter(torch.randn(S * N, dec["dim"]) * 0.02)
        self.decoder = Transformer(dec["dim"], dec["depth"], dec["heads"], cfg.mlp_ratio,
                                   S if cfg.dec_per_scale_params else 1)
        self.patch_out = nn.ModuleList(nn.Linear(dec["dim"], cfg.patch_dim(s)) for s in range(S))

    # ---------------------------------------------------------------- helpers

    def scales_for(self, resolution: int) -> int:
        """Number of scales an input of this resolution has (its DWT levels + 1)."""
        k = int(round(math.log2(self.cfg.resolution / resolution)))
        if resolution << k != self.cfg.resolution or k >= self.cfg.num_scales:
            raise ValueError(f"resolution {resolution} is not the model's {self.cfg.resolution} / 2^k, k < {self.cfg.num_scales}")
        return self.cfg.num_scales - k

    def _causal_sizes(self, causal: bool, s: int) -> tuple[int, ...] | None:
        """The scale-causal mask's blocks (N tokens per scale, §4.1) over s scales, or None (dense)."""
        return (self.cfg.tokens_per_scale,) * s if causal else None

    def image_to_scales(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """DWT coefficients of an image in [0, 1], scaled to the model's top resolution (see module doc)."""
        s = self.scales_for(x_B3HW.shape[-1])
        gain = 2.0 ** (self.cfg.num_scales - s)
        return [c * gain for c in haar_dwt(x_B3HW * 2 - 1, s - 1)]

    def scales_to_image(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """Image in [0, 1] (not clamped) from the first len(scales) scales, at their native resolution."""
        gain = 2.0 ** (self.cfg.num_scales - len(scales))
        return (haar_idwt([c / gain for c in scales]) + 1) / 2

    # ---------------------------------------------------------------- encode / decode

    def encode_scales(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """DWT coefficients of the first S' scales → pre-quantisation features (B, S', N, C)."""
        s = len(scales)
        if not self.cfg.causal_encoder and s != self.cfg.num_scales:
            raise ValueError("only a scale-causal encoder (SIT-SC / SIT-SCE) encodes lower resolutions")
        tokens = torch.cat([self.patch_in[i](patchify(c, self.cfg.grid)) for i, c in enumerate(scales)], dim=1)
        h = tokens + self.pos_enc[: tokens.shape[1]]  # (B, S'N, C)
        z = self.encoder(h, s, self._causal_sizes(self.cfg.causal_encoder, s))
        return _grouped(z, s)  # (B, S', N, C)

    def encode(self, x_B3HW: torch.Tensor, return_terms: bool = False):
        """Image → (quantized (B, S', N, C), indices (B, S', N), aux_loss[, terms]); S' from its size."""
        return self.quantizer(self.encode_scales(self.image_to_scales(x_B3HW)), return_terms=return_terms)

    def decode(self, quantized_BSNC: torch.Tensor) -> list[torch.Tensor]:
        """Quantized tokens of the first S' scales → predicted DWT coefficients of those scales."""
        B, s, N, C = quantized_BSNC.shape
        if not self.cfg.causal_decoder and s != self.cfg.num_scales:
            raise ValueError("only a scale-causal decoder (SIT-SC / SIT-SCD) decodes partial sequences")
        h = self.to_dec(quantized_BSNC.reshape(B, s * N, C))
        h = h + self.pos_dec[: s * N]
        y = self.decoder(h, s, self._causal_sizes(self.cfg.causal_decoder, s))  # (B, S'N, Cd)
        y = _grouped(y, s)  # (B, S', N, Cd)
        return [unpatchify(self.patch_out[i](y[:, i]), self.cfg.scale_shape(i)[0], self.cfg.grid) for i in range(s)]

    def decode_indices(self, indices_BSN: torch.Tensor) -> torch.Tensor:
        """Token ids of the first S' scales → image at the native resolution of S' scales."""
        return self.scales_to_image(self.decode(self.quantizer.indices_to_codes(indices_BSN)))

    def forward(self, x_B3HW: torch.Tensor):
        """The tokenizer contract: (reconstruction in [0, 1] (unclamped) (B, 3, H, W), indices
        (B, S', N), losses): ``losses["aux"]`` is the quantizer loss to add to the objective, the
        other entries its terms (for logging)."""
        q, indices, aux, terms = self.encode(x_B3HW, return_terms=True)
        return self.scales_to_image(self.decode(q)), indices, {"aux": aux, **terms}


def build_tokenizer(cfg: SITConfig) -> SpectralTokenizer:
    """The one builder: SIT for ``num_scales > 1``, the ViT-VQGAN baseline for ``num_scales == 1``."""
    return SpectralTokenizer(cfg)
