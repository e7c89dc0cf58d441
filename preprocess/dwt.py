"""Multi-level 2-D Haar DWT in the ``spectral`` dataset layout (pywavelets reference).

Layout (DESIGN.md): ``scale_0`` is the level-L approximation (C, r/2^L, r/2^L); ``scale_s`` for
s = 1..L (coarse to fine) stacks the H, V, D detail bands of level L-s+1 along channels, so it is
(3C, r/2^(L-s+1), ...) with H's channels first, then V's, then D's — the order of
``pywt.wavedec2`` output.
"""

from __future__ import annotations

import numpy as np
import pywt

from coarse2fine.preprocess.schema import WAVELET


def haar_dwt(x_CHW: np.ndarray, levels: int) -> list[np.ndarray]:
    """``[scale_0, scale_1, ..., scale_L]`` of an image (C, H, W)."""
    assert x_CHW.ndim == 3, f"expected (C,H,W), got {x_CHW.shape}"
    assert x_CHW.shape[1] % (2**levels) == 0 and x_CHW.shape[2] % (2**levels) == 0, "size not divisible by 2**levels"
    coeffs = pywt.wavedec2(x_CHW, WAVELET, level=levels, axes=(-2, -1))
    scales = [coeffs[0]]
    for h, v, d in coeffs[1:]:
        scales.append(np.concatenate([h, v, d], axis=0))  # (3C, h, w)
    return scales


def haar_idwt(scales: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`haar_dwt`; zeroed finer scales give the coarse image (partial decode)."""
    coeffs = [scales[0]]
    for s in scales[1:]:
        coeffs.append(tuple(np.split(s, 3, axis=0)))  # (3C,h,w) -> H, V, D each (C,h,w)
    return pywt.waverec2(coeffs, WAVELET, axes=(-2, -1))
