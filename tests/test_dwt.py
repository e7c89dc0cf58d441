"""Haar DWT layout equals pywt.wavedec2 and inverts with pywt.waverec2."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coarse2fine.preprocess.dwt import haar_dwt, haar_idwt


def test_layout_matches_wavedec2():
    x = np.random.default_rng(0).random((3, 32, 32))
    scales = haar_dwt(x, 3)
    ref = pywt.wavedec2(x, "haar", level=3, axes=(-2, -1))
    assert [s.shape for s in scales] == [(3, 4, 4), (9, 4, 4), (9, 8, 8), (9, 16, 16)]
    np.testing.assert_array_equal(scales[0], ref[0])
    for s, (h, v, d) in zip(scales[1:], ref[1:]):
        np.testing.assert_array_equal(s[0:3], h)
        np.testing.assert_array_equal(s[3:6], v)
        np.testing.assert_array_equal(s[6:9], d)
    np.testing.assert_allclose(pywt.waverec2(ref, "haar", axes=(-2, -1)), x, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(levels=st.integers(1, 4), mult=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_idwt_inverts_dwt(levels, mult, seed):
    side = mult * 2**levels
    x = np.random.default_rng(seed).normal(size=(3, side, side))
    np.testing.assert_allclose(haar_idwt(haar_dwt(x, levels)), x, atol=1e-10)


def test_partial_decode_is_coarse_image():
    """Zeroing the detail scales decodes the approximation: a 2^L-block average image."""
    x = np.random.default_rng(1).random((3, 16, 16))
    scales = haar_dwt(x, 2)
    coarse = haar_idwt([scales[0]] + [np.zeros_like(s) for s in scales[1:]])
    block = x.reshape(3, 4, 4, 4, 4).mean(axis=(2, 4))  # (C, 4, 4) block means
    np.testing.assert_allclose(coarse, np.repeat(np.repeat(block, 4, 1), 4, 2), atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("levels, h, w", [(1, 6, 10), (3, 16, 40), (3, 40, 8), (2, 12, 12)])
def test_torch_dwt_equals_pywavelets_band_by_band(levels, h, w, dtype, atol):
    """The training DWT's torch reference (train/kernels/haar.py) against pywt.wavedec2 per
    band on non-square images, odd level counts and float32: swapped H/V bands, a transposed
    image or a wrong level order fail it; the inverse recovers the input."""
    from coarse2fine.train.kernels.haar import haar_dwt_reference as torch_dwt, haar_idwt_reference as torch_idwt

    x = torch.from_numpy(np.random.default_rng(h * w + levels).normal(size=(2, 3, h, w))).to(dtype)
    ours = torch_dwt(x, levels)
    ref = pywt.wavedec2(x.double().numpy(), "haar", level=levels, axes=(-2, -1))
    assert ours[0].dtype == dtype and ours[0].shape == (2, 3, h >> levels, w >> levels)
    np.testing.assert_allclose(ours[0].double().numpy(), ref[0], atol=atol)
    for s, (bh, bv, bd) in zip(ours[1:], ref[1:]):
        for i, band in enumerate((bh, bv, bd)):
            np.testing.assert_allclose(s[:, 3 * i: 3 * i + 3].double().numpy(), band, atol=atol)
    np.testing.assert_allclose(torch_idwt(ours).double().numpy(), x.double().numpy(), atol=10 * atol)


@pytest.mark.parametrize("h, w, levels, ok", [(5, 4, 1, False), (4, 5, 1, False), (4, 4, 1, True), (12, 8, 3, False),
                                                (8, 12, 3, False), (8, 8, 3, True)])
def test_haar_dwt_refuses_sides_not_divisible_by_its_levels_and_only_them(h, w, levels, ok):
    """A side that turns odd at some level is refused; odd batch and channel counts are fine (mutation
    testing found the precondition unpinned: `or` for `and`, the batch axis, one side checked twice)."""
    from coarse2fine.train.kernels.haar import haar_dwt

    x = torch.zeros(3, 1, h, w)
    if ok:
        assert haar_dwt(x, levels)[0].shape == (3, 1, h >> levels, w >> levels)
    else:
        with pytest.raises(AssertionError, match="odd size"):
            haar_dwt(x, levels)
