"""Metric math against independent references (scipy sqrtm, torchmetrics, scikit-image)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.image.kid import poly_mmd

from coarse2fine.evaluate.metrics import (
    FeatureStats,
    codebook_usage,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    reconstruction_metrics,
    unique_token_ratio,
)


def features(seed: int, n: int = 300, d: int = 64, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The classic float64 reference (pytorch-fid's formula with scipy.linalg.sqrtm)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("shift", [0.0, 0.3, 2.0])
def test_frechet_distance_matches_scipy_sqrtm_reference(shift):
    a, b = features(0), features(1, shift=shift)
    ours = frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b))
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-4)


def test_fid_of_a_set_with_itself_is_zero():
    a = features(3)
    s = FeatureStats.from_features(a)
    assert abs(frechet_distance(s, s)) < 1e-8


def test_kid_matches_torchmetrics_poly_mmd():
    a, b = features(0, n=120), features(1, n=120, shift=0.2)
    mean, std = kernel_inception_distance(a, b, subsets=1, subset_size=120)
    ref = float(poly_mmd(torch.as_tensor(a), torch.as_tensor(b), degree=3, gamma=None, coef=1.0))
    assert mean == pytest.approx(ref, rel=1e-4) and std == 0.0


def test_kid_subsets_are_seeded():
    a, b = features(0, n=200), features(1, n=200)
    assert kernel_inception_distance(a, b, 10, 50, seed=1) == kernel_inception_distance(a, b, 10, 50, seed=1)


def test_inception_score_formula():
    logits = np.random.default_rng(0).normal(size=(100, 10)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = [np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0, keepdims=True))), 1))) for c in np.split(p, 5)]
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(np.mean(ref), rel=1e-6) and std == pytest.approx(np.std(ref), rel=1e-6)
    # uniform predictions: IS = 1
    assert inception_score(np.zeros((50, 10)), 5)[0] == pytest.approx(1.0)
    # by hand: confident predictions spread evenly over 4 classes, KL = log 4 for every sample, IS = 4
    assert inception_score(np.eye(4)[np.arange(40) % 4] * 50, 2)[0] == pytest.approx(4.0, rel=1e-6)
    # two classes, p(y|x) = (0.9, 0.1) or (0.1, 0.9) half each: p(y) = (0.5, 0.5),
    # KL = 0.9 log 1.8 + 0.1 log 0.2, IS = exp(KL)
    two = np.log(np.array([[0.9, 0.1], [0.1, 0.9]] * 10))
    assert inception_score(two, 1)[0] == pytest.approx(np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2)), rel=1e-6)


def test_psnr_ssim_l1_agree_with_scikit_image():
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 32, 32))
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    m = reconstruction_metrics(torch.as_tensor(x), torch.as_tensor(y))
    for i in range(3):
        assert float(m["psnr"][i]) == pytest.approx(peak_signal_noise_ratio(x[i], y[i], data_range=1.0), rel=1e-6)
        ref_ssim = structural_similarity(x[i], y[i], channel_axis=0, data_range=1.0, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
        assert float(m["ssim"][i]) == pytest.approx(ref_ssim, abs=1e-3)
        assert float(m["l1"][i]) == pytest.approx(np.abs(x[i] - y[i]).mean())


def test_metrics_clamp_reconstructions_and_weigh_ssim_constants_at_low_contrast():
    """Out-of-range reconstructions are scored as clamped to [0, 1] (compared with scikit-image on
    the clipped images), and at low contrast, where SSIM's stabilising constants C1 = (0.01 L)²,
    C2 = (0.03 L)² dominate, SSIM still matches scikit-image with L = 1."""
    rng = np.random.default_rng(1)
    wide = rng.random((2, 3, 32, 32))
    flat = 0.5 + 0.01 * rng.random((2, 3, 32, 32))
    for x, y in ((wide, wide + rng.normal(0, 0.3, wide.shape)), (flat, flat + rng.normal(0, 0.01, flat.shape))):
        m = reconstruction_metrics(torch.as_tensor(x), torch.as_tensor(y))
        for i in range(2):
            yc = np.clip(y[i], 0, 1)
            assert float(m["psnr"][i]) == pytest.approx(peak_signal_noise_ratio(x[i], yc, data_range=1.0), rel=1e-6)
            assert float(m["l1"][i]) == pytest.approx(np.abs(x[i] - yc).mean())
            if x is flat:  # SSIM ≈ 0.9 here with L = 1 and ≈ 0.1 without the constants; the two libraries'
                # border handling differs by about 1e-3
                ref = structural_similarity(x[i], yc, channel_axis=0, data_range=1.0, gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False)
                assert float(m["ssim"][i]) == pytest.approx(ref, abs=0.01)


def test_feature_stats_count_samples_and_protocol_defaults_are_the_standard_ones():
    """``n`` is the number of samples (reported beside every FID); KID defaults to 100 subsets of
    1000 (Bińkowski et al., torch-fidelity), seed 0; IS to 10 splits (Salimans et al.)."""
    import inspect

    assert FeatureStats.from_features(np.random.default_rng(0).random((7, 3))).n == 7
    kid = inspect.signature(kernel_inception_distance).parameters
    assert (kid["subsets"].default, kid["subset_size"].default, kid["seed"].default) == (100, 1000, 0)
    assert inspect.signature(inception_score).parameters["splits"].default == 10


@pytest.mark.parametrize("call", [
    lambda: reconstruction_metrics(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9)),
    lambda: reconstruction_metrics(torch.zeros(1, 3, 8, 9), torch.zeros(1, 3, 8, 8)),
    lambda: reconstruction_metrics(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)),
    lambda: reconstruction_metrics(torch.zeros(1, 1, 3, 8, 8), torch.zeros(1, 1, 3, 8, 8)),
    lambda: FeatureStats.from_features(np.zeros((1, 4))),
    lambda: FeatureStats.from_features(np.zeros((2, 3, 4))),
    lambda: codebook_usage(np.array([-1, 0]), 8),
])
def test_bad_metric_inputs_are_refused(call):
    with pytest.raises(AssertionError):
        call()


def test_two_samples_are_enough_for_feature_stats():
    assert FeatureStats.from_features(np.array([[0.0, 1.0], [1.0, 0.0]])).n == 2


def test_codebook_usage_and_unique_ratio():
    idx = np.array([[0, 0, 1, 1], [2, 3, 3, 3]])
    assert codebook_usage(idx, 8) == 0.5
    assert unique_token_ratio(idx) == pytest.approx((2 / 4 + 2 / 4) / 2)
    with pytest.raises(AssertionError):
        codebook_usage(np.array([9]), 8)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(3, 40), d=st.integers(2, 12), seed=st.integers(0, 1000))
def test_property_fid_non_negative_and_symmetric(n, d, seed):
    a, b = features(seed, n, d), features(seed + 1, n, d, shift=0.1)
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    ab, ba = frechet_distance(sa, sb), frechet_distance(sb, sa)
    assert ab > -1e-6 and ab == pytest.approx(ba, rel=1e-5, abs=1e-6)
