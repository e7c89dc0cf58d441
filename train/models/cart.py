"""CART's base-detail VQ-VAE (CART seed §3.2, Algorithms 1–2; Fig. 2a).

The shared conv autoencoder (``conv_ae.py``) encodes the image I and every Mumford–Shah base
B_1 … B_n (eq. 11); the detail features are differences of base features, f_{D_k} = f_{B_{k−1}} −
f_{B_k} with f_{B_0} = f_I (eq. 12). One codebook (V codes, seed §4.1) serves every map. The base
f_{B_n} is quantized VAR-style over ``base_scales`` (multi-scale residual maps), then each detail,
D_n first, in ``detail_depth`` residual maps at the full latent side (``residual_vq.py``). The
decoder sees f̂ = Σ_k φ_k(z_k) (Algorithm 2), which approximates f_{B_n} + Σ_k f_{D_k} = f_I.

What the seed leaves open, chosen here (all parameters):
- the map schedule: ``base_scales`` (1, 2, 3, 4, 5, 6, 8) are VAR's first scales, ending at the
  8×8 latent of a 64 px image at f = 8 (the last base scale must be the latent side, so that the
  base's residual is quantized at full resolution as VAR's last scale is); ``detail_depth`` 1
  (M − B = n, the smallest depth the seed's (M − B)/n allows);
- φ: VAR's partially shared convolutions (4 φ's, ratio 0.5), not one φ per map (Algorithm 2's
  φ_k) nor one shared φ (Algorithm 1's φ): ``num_phi`` = the number of maps gives the former;
- Algorithm 1's typos, read as: f_{D_i} ← f_{B_{i−1}} − f_{B_i}; base codes are upsampled to the
  full latent side (h × w, not h_k × w_k) before φ; the detail counter runs D_n … D_1, each
  detail with its own residual (the base's quantization error is not carried into the details);
- codebook loss with β = 0.25 commitment on each factor's cumulative f̂ and the straight-through
  estimator onto f_I are VAR / VQ-VAE practice, not in the seed. AdaLN is VAR's, not used here.

``order = 0`` is VAR's multi-scale residual tokenizer (the seed's Table 4 baseline); with
``base_scales`` all equal to the latent side it is a full-resolution residual VQ-VAE (RQ-VAE, the
"vanilla" curve of Fig. 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from coarse2fine.train.models.conv_ae import build_pair, check_shape
from coarse2fine.train.models.quantizer import EuclideanVQ
from coarse2fine.train.models.residual_vq import PhiPartiallyShared, map_schedule, residual_quantize, to_full, to_side


@dataclass
class CARTConfig:
    resolution: int = 64
    size: str = "tiny"  # conv widths (conv_ae.CONV_SIZES)
    downsample: int = 8  # f: 64 px → 8×8 latents (the seed's 16 at 256 px)
    z_channels: int = 32  # latent channels C (VAR's Cvae = 32)
    codebook_size: int = 4096  # V (seed §4.1)
    order: int = 3  # n: details D_1 … D_n (seed §4.1: 3rd order); 0 = VAR's multi-scale tokenizer
    base_scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)  # B base maps (sides); the last = latent side
    detail_depth: int = 1  # (M − B) / n residual maps per detail
    num_phi: int = 4  # VAR's share_quant_resi
    phi_ratio: float = 0.5  # VAR's quant_resi; 0 = identity φ
    beta: float = 0.25

    def __post_init__(self) -> None:
        self.base_scales = tuple(int(s) for s in self.base_scales)
        check_shape(self.size, self.downsample, self.resolution)
        side = self.resolution // self.downsample
        if not self.base_scales or list(self.base_scales) != sorted(self.base_scales) or min(self.base_scales) < 1:
            raise ValueError(f"base_scales must be a non-empty non-decreasing list of sides, got {list(self.base_scales)}")
        if self.base_scales[-1] != side:
            raise ValueError(f"the last base scale must be the latent side {side} "
                             f"({self.resolution}px / {self.downsample}), got {self.base_scales[-1]}")
        if self.order < 0 or self.detail_depth < 1 or self.num_phi < 1 or self.codebook_size < 2:
            raise ValueError("order must be >= 0, detail_depth and num_phi >= 1, codebook_size >= 2")
        if not 0 <= self.phi_ratio <= 1:
            raise ValueError("phi_ratio must be in [0, 1]")

    @property
    def latent_side(self) -> int:
        return self.resolution // self.downsample

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """(side, factor) of every token map in sequence order (factor 0 = base, k = detail D_k)."""
        return map_schedule(self.base_scales, self.order, self.detail_depth)

    @property
    def map_sizes(self) -> list[int]:
        return [s * s for s, _ in self.schedule]


class CARTTokenizer(nn.Module):
    def __init__(self, cfg: CARTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = build_pair(cfg.size, cfg.downsample, cfg.z_channels, cfg.z_channels)
        self.quantizer = EuclideanVQ(cfg.z_channels, cfg.codebook_size, beta=cfg.beta)  # the shared codebook
        self.phi_bank = PhiPartiallyShared(cfg.z_channels, cfg.num_phi, cfg.phi_ratio)

    def phi(self, m: int, z_BChw: torch.Tensor) -> torch.Tensor:
        return self.phi_bank(m, len(self.cfg.schedule), z_BChw)

    def quantize(self, r_BCss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest shared-codebook code of every position: (codes (B, C, s, s), ids (B, s, s))."""
        B, C, s, _ = r_BCss.shape
        idx_BN = self.quantizer.nearest(r_BCss.flatten(2).transpose(1, 2))  # (B, s·s)
        return self.codes(idx_BN.view(B, s, s)), idx_BN.view(B, s, s)

    def codes(self, ids_Bss: torch.Tensor) -> torch.Tensor:
        """Code vectors of a token map: (B, s, s) → (B, C, s, s)."""
        return self.quantizer.indices_to_codes(ids_Bss).permute(0, 3, 1, 2)

    def features(self, x_B3HW: torch.Tensor, bases_Bn3HW: torch.Tensor | None) -> list[torch.Tensor]:
        """Quantization targets [f_{B_n}, f_{D_1}, …, f_{D_n}] (eqs. 11–12), one encoder pass over
        I and every base (order 0 takes no bases: ``None``)."""
        n, B = self.cfg.order, len(x_B3HW)
        if n == 0:
            return [self.encoder(x_B3HW * 2 - 1)]
        assert bases_Bn3HW is not None and bases_Bn3HW.shape[1] >= n, f"order {n} needs the images' {n} bases"
        stack = torch.cat([x_B3HW[:, None], bases_Bn3HW[:, :n].to(x_B3HW)], dim=1)  # (B, 1+n, 3, H, W): I, B_1 … B_n
        f = self.encoder(stack.flatten(0, 1) * 2 - 1)  # ((1+n)·B, C, h, w)
        f = f.view(B, n + 1, *f.shape[1:])  # (B, 1+n, C, h, w)
        return [f[:, n]] + [f[:, k - 1] - f[:, k] for k in range(1, n + 1)]

    def encode(self, x_B3HW: torch.Tensor, bases_Bn3HW: torch.Tensor | None = None):
        """Algorithm 1: (f̂ (B, C, h, w) with the straight-through gradient onto f_I, ids of every
        map, VQ loss)."""
        assert x_B3HW.shape[-1] == self.cfg.resolution, f"expects {self.cfg.resolution}px images"
        targets = self.features(x_B3HW, bases_Bn3HW)
        f_hat, ids, loss = residual_quantize(targets, self.cfg.schedule, self.quantize, self.phi, self.cfg.beta)
        f_I = sum(targets)  # f_{B_n} + Σ f_{D_k} = f_I (eq. 12 telescopes)
        return f_I + (f_hat - f_I).detach(), ids, loss

    def decode(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Features → image in [0, 1] (unclamped)."""
        return (self.decoder(f_hat_BChw) + 1) / 2

    def add_map(self, f_hat_BChw: torch.Tensor, m: int, ids_Bss: torch.Tensor) -> torch.Tensor:
        """f̂ + φ_m(codes of map m upsampled to the latent side): one step of Algorithm 2."""
        return f_hat_BChw + self.phi(m, to_full(self.codes(ids_Bss), self.cfg.latent_side))

    def map_input(self, f_hat_BChw: torch.Tensor, m: int) -> torch.Tensor:
        """The generator's input for map m (VAR): the cumulative f̂ of the earlier maps
        area-downsampled to map m's side, as tokens (B, s·s, C)."""
        return to_side(f_hat_BChw, self.cfg.schedule[m][0]).flatten(2).transpose(1, 2)

    def empty_features(self, batch: int) -> torch.Tensor:
        s = self.cfg.latent_side
        return self.quantizer.codebook.new_zeros(batch, self.cfg.z_channels, s, s)

    def features_of_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Σ_m φ_m(codes of map m) over the first maps (Algorithm 2's f̂)."""
        f_hat = self.empty_features(len(maps[0]))
        for m, ids in enumerate(maps):
            f_hat = self.add_map(f_hat, m, ids)
        return f_hat

    @torch.no_grad()
    def teacher_inputs(self, ids_BL: torch.Tensor) -> torch.Tensor:
        """Inputs of maps 1 … M−1 for teacher forcing (VAR's ``idxBl_to_var_input``):
        (B, L − |map 0|, C), the same values the sampler feeds after each map."""
        maps = self.split(ids_BL)
        f_hat, out = self.empty_features(len(ids_BL)), []
        for m, ids in enumerate(maps[:-1]):
            f_hat = self.add_map(f_hat, m, ids)
            out.append(self.map_input(f_hat, m + 1))
        return torch.cat(out, dim=1)

    def split(self, ids_BL: torch.Tensor) -> list[torch.Tensor]:
        """A flat sequence (B, L' ≤ L) → its maps (B, s, s) in order (a prefix gives the first maps)."""
        out, t = [], 0
        for s, _ in self.cfg.schedule:
            if t + s * s > ids_BL.shape[1]:
                break
            out.append(ids_BL[:, t: t + s * s].reshape(len(ids_BL), s, s))
            t += s * s
        assert t == ids_BL.shape[1], "the sequence does not end at a map boundary"
        return out

    def decode_indices(self, ids_BL: torch.Tensor) -> torch.Tensor:
        """Algorithm 2 from a flat sequence (all maps, or the first maps only: a coarser image)."""
        return self.decode(self.features_of_maps(self.split(ids_BL)))

    def forward(self, x_B3HW: torch.Tensor, bases_Bn3HW: torch.Tensor | None = None):
        """The tokenizer contract: (reconstruction, ids (B, L) in sequence order, {"aux": VQ loss})."""
        f_hat, ids, loss = self.encode(x_B3HW, bases_Bn3HW)
        return self.decode(f_hat), torch.cat([i.flatten(1) for i in ids], dim=1), {"aux": loss}


def build_cart(cfg: CARTConfig) -> CARTTokenizer:
    return CARTTokenizer(cfg)
