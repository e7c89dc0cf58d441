"""One level of the orthonormal 2-D Haar transform (pywavelets' ``'haar'`` layout), torch reference.

For each 2×2 block ``[[a, b], [c, d]]``::

    A = (a + b + c + d) / 2    H = (a + b - c - d) / 2
    V = (a - b + c - d) / 2    D = (a - b - c + d) / 2

which is exactly ``pywt.dwt2(x, 'haar')`` (checked in tests). These are the ops a Triton kernel
replaces behind the same signature.
"""

from __future__ import annotations

import torch


def haar_level(x_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, C, h, w)`` → ``(A (B, C, h/2, w/2), HVD (B, 3C, h/2, w/2))``, HVD = [H | V | D]."""
    assert x_BChw.shape[-1] % 2 == 0 and x_BChw.shape[-2] % 2 == 0, f"odd size {tuple(x_BChw.shape)}"
    a, b = x_BChw[..., 0::2, 0::2], x_BChw[..., 0::2, 1::2]
    c, d = x_BChw[..., 1::2, 0::2], x_BChw[..., 1::2, 1::2]
    approx = (a + b + c + d) * 0.5
    hvd = torch.cat([(a + b - c - d) * 0.5, (a - b + c - d) * 0.5, (a - b - c + d) * 0.5], dim=1)
    return approx, hvd


def ihaar_level(approx_BChw: torch.Tensor, hvd_B3Chw: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_level`: ``(B, C, h, w)`` and ``(B, 3C, h, w)`` → ``(B, C, 2h, 2w)``."""
    h_, v_, d_ = hvd_B3Chw.chunk(3, dim=1)
    A = approx_BChw
    B, C, h, w = A.shape
    out = A.new_empty(B, C, 2 * h, 2 * w)
    out[..., 0::2, 0::2] = (A + h_ + v_ + d_) * 0.5
    out[..., 0::2, 1::2] = (A + h_ - v_ - d_) * 0.5
    out[..., 1::2, 0::2] = (A - h_ + v_ - d_) * 0.5
    out[..., 1::2, 1::2] = (A - h_ - v_ + d_) * 0.5
    return out
