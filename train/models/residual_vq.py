"""Multi-scale residual quantization of feature maps (VAR) and its base-detail form (CART seed
Algorithm 1), shared by the CART tokenizer at every decomposition order.

A *map schedule* lists the token maps in sequence order as ``(side, factor)``: ``factor`` 0 is the
base B_n (VAR's multi-scale maps of growing side), ``factor`` k ≥ 1 is the detail D_k (maps at the
full latent side). Each factor has its own residual, starting at its target feature map; every map
of that factor quantizes the residual (area-downsampled to ``side`` × ``side`` when smaller than
the latent, VAR), upsamples the codes back (bicubic, VAR), passes them through φ and subtracts
them. The reconstruction f̂ is the sum of φ(codes) over all maps (Algorithm 2), so with identity
quantization and identity φ it telescopes to the sum of the targets.

From VAR (the seed does not say): area/bicubic interpolation, φ(z) = (1 − r)·z + r·conv3×3(z)
with r = 0.5 (``quant_resi``), ``num_phi`` = 4 φ's partially shared across maps by relative depth
(``share_quant_resi``), the per-map codebook/commitment loss on the cumulative f̂ of the factor,
residuals computed from detached features.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Quantize = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # r_BCss -> (codes_BCss, ids_Bss)


class Phi(nn.Module):
    """VAR's φ: ``(1 − ratio)·z + ratio·conv3×3(z)``; ``ratio = 0`` is the identity."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0:
            return z_BChw
        return z_BChw * (1 - self.ratio) + self.conv(z_BChw) * self.ratio


class PhiPartiallyShared(nn.Module):
    """``count`` φ's; map m of M uses the one whose tick (evenly spaced in (0, 1), VAR's
    ``PhiPartiallyShared``) is nearest to m / (M − 1). ``count = M`` gives one φ per map (the
    φ_k of the seed's Algorithm 2)."""

    def __init__(self, channels: int, count: int, ratio: float) -> None:
        super().__init__()
        assert count >= 1
        self.phis = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        k = count
        self.register_buffer("ticks", torch.linspace(1 / 3 / k, 1 - 1 / 3 / k, k), persistent=False)

    def forward(self, m: int, num_maps: int, z_BChw: torch.Tensor) -> torch.Tensor:
        at = m / max(num_maps - 1, 1)
        return self.phis[int((self.ticks - at).abs().argmin())](z_BChw)


def map_schedule(base_scales: Sequence[int], order: int, detail_depth: int) -> list[tuple[int, int]]:
    """CART's maps (seed §3.2, Fig. 2a): the base maps of ``base_scales``, then ``detail_depth``
    full-side maps per detail, D_n first and D_1 last (coarse to fine detail)."""
    full = base_scales[-1]
    return [(s, 0) for s in base_scales] + [(full, k) for k in range(order, 0, -1) for _ in range(detail_depth)]


def to_side(f_BChw: torch.Tensor, side: int) -> torch.Tensor:
    """Area-downsample features to ``side`` × ``side`` (VAR); identity at the full side."""
    return f_BChw if f_BChw.shape[-1] == side else F.interpolate(f_BChw, size=(side, side), mode="area")


def to_full(z_BCss: torch.Tensor, full: int) -> torch.Tensor:
    """Bicubic-upsample codes to the full latent side (VAR); identity at the full side."""
    return z_BCss if z_BCss.shape[-1] == full else F.interpolate(z_BCss, size=(full, full), mode="bicubic")


def residual_quantize(targets: list[torch.Tensor], schedule: list[tuple[int, int]], quantize: Quantize,
                      phi: Callable[[int, torch.Tensor], torch.Tensor], beta: float
                      ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Algorithm 1 (and its sum, Algorithm 2) over the factors' target feature maps.

    ``targets[k]`` (B, C, h, h): factor k's features (k = 0 the base f_{B_n}, k ≥ 1 the detail
    f_{D_k}). Returns f̂ (B, C, h, h), the ids of every map ((B, side, side) each) and VAR's
    vector-quantization loss: per map, ``β‖sg[f̂_k] − f_k‖² + ‖f̂_k − sg[f_k]‖²`` on the factor's
    cumulative f̂_k, averaged over maps."""
    full = targets[0].shape[-1]
    assert all(t.shape == targets[0].shape for t in targets), "factor features must share one shape"
    rest = [t.detach().clone() for t in targets]  # (B, C, h, h) residual per factor
    per_factor = [torch.zeros_like(t) for t in targets]
    f_hat = torch.zeros_like(targets[0])
    ids, loss = [], targets[0].new_zeros(())
    for m, (side, k) in enumerate(schedule):
        codes, idx = quantize(to_side(rest[k], side))  # (B, C, s, s), (B, s, s)
        h = phi(m, to_full(codes, full))  # (B, C, h, h)
        rest[k] = rest[k] - h.detach()
        per_factor[k] = per_factor[k] + h
        f_hat = f_hat + h
        ids.append(idx)
        loss = loss + beta * F.mse_loss(per_factor[k].detach(), targets[k]) + F.mse_loss(per_factor[k], targets[k].detach())
    return f_hat, ids, loss / len(schedule)
