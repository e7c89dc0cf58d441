"""Batched, multi-level, differentiable Haar DWT/IDWT in the ``spectral`` dataset layout.

``haar_dwt(x, L)`` returns ``[scale_0, scale_1, …, scale_L]``: ``scale_0`` the level-L
approximation (B, C, r/2^L, r/2^L), ``scale_s`` the H|V|D details of level L-s+1 stacked on
channels (B, 3C, …), coarse to fine — the layout of ``coarse2fine.preprocess.dwt`` (pywavelets).
The per-level op comes from ``train.kernels.haar`` (its Triton kernel on CUDA, the torch reference elsewhere).
"""

from __future__ import annotations

import torch

from coarse2fine.train.kernels.haar import haar_level, ihaar_level


def haar_dwt(x_BCHW: torch.Tensor, levels: int) -> list[torch.Tensor]:
    assert x_BCHW.ndim == 4, f"expected (B, C, H, W), got {tuple(x_BCHW.shape)}"
    details = []
    approx = x_BCHW
    for _ in range(levels):
        approx, hvd = haar_level(approx)
        details.append(hvd)
    return [approx] + details[::-1]


def haar_idwt(scales: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`haar_dwt` (any number of scales: fewer scales give a coarser image)."""
    x = scales[0]
    for hvd in scales[1:]:
        x = ihaar_level(x, hvd)
    return x
