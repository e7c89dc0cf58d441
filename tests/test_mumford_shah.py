"""Ambrosio–Tortorelli decomposition (CART eq. 8–10): exactness, energy descent, edge behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coarse2fine.preprocess.mumford_shah import ATParams, ambrosio_tortorelli, decompose, total_variation


def step_image(n: int = 32, noise: float = 0.03, seed: int = 0) -> np.ndarray:
    """Left half 0.2, right half 0.8 (all channels), plus Gaussian noise."""
    x = np.full((3, n, n), 0.2)
    x[:, :, n // 2 :] = 0.8
    return x + np.random.default_rng(seed).normal(0, noise, x.shape)


def photo(n: int = 48) -> np.ndarray:
    from skimage import data, transform

    return transform.resize(data.astronaut() / 255.0, (n, n), anti_aliasing=True).transpose(2, 0, 1)


def test_layers_sum_exactly_to_image():
    x = photo()
    d = decompose(x, 3)
    np.testing.assert_allclose(d.base + sum(d.details), x, atol=1e-12)
    # B_{k-1} = B_k + D_k for every k
    b = d.base
    for k in range(3, 0, -1):
        b = b + d.details[k - 1]
    np.testing.assert_allclose(b, x, atol=1e-12)


def test_energy_non_increasing_and_edges_in_unit_interval():
    for x in (photo(), step_image()):
        r = ambrosio_tortorelli(x, ATParams(max_outer=8, outer_tol=1e-9))
        e = np.array(r.energies)
        assert len(e) >= 3
        assert np.all(np.diff(e) <= 1e-12 * e[0]), e
        assert r.s.min() >= 0.0 and r.s.max() <= 1.0


def test_step_edge_is_kept_while_flat_noise_is_smoothed():
    x = step_image()
    r = ambrosio_tortorelli(x)
    n = x.shape[-1]
    # the step stays a step in the base: the jump across the boundary is still ~0.6
    jump = r.u[:, :, n // 2].mean() - r.u[:, :, n // 2 - 1].mean()
    assert jump > 0.5, jump
    # the edge map marks the boundary and little else
    assert r.s[:, n // 2 - 1].mean() > 0.5
    assert (r.s > 0.5).mean() < 0.1
    # noise in the flat regions is smoothed away: their total variation drops by more than half
    flat = (slice(None), slice(None), slice(2, n // 2 - 3))
    assert total_variation(r.u[flat]) < 0.5 * total_variation(x[flat])


def test_smooths_without_edges_when_lambda_is_huge():
    """λ → ∞ makes edges unaffordable: the result is plain Tikhonov smoothing, s ≈ 0."""
    r = ambrosio_tortorelli(step_image(), ATParams(lambda_=1e6))
    assert r.s.max() < 1e-3


def test_deterministic():
    x = photo(32)
    a, b = decompose(x, 2), decompose(x, 2)
    np.testing.assert_array_equal(a.base, b.base)
    np.testing.assert_array_equal(a.edges[1], b.edges[1])
    assert a.iterations == b.iterations


def test_defaults_match_seed_and_give_sparse_edges():
    p = ATParams()
    assert (p.alpha, p.lambda_) == (10.0, 0.01)  # CART section 4
    d = decompose(photo(64), 3)
    assert all(0.0 < f < 0.35 for f in d.edge_fraction), d.edge_fraction
    assert d.tv_reduction[0] > 0.2, d.tv_reduction


def test_invalid_params_rejected():
    with pytest.raises(ValueError):
        ATParams(alpha=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), order=st.integers(1, 3))
def test_property_exact_sum_and_bounds(seed, order):
    x = np.random.default_rng(seed).random((3, 12, 12))
    d = decompose(x, order, ATParams(max_outer=3))
    np.testing.assert_allclose(d.base + sum(d.details), x, atol=1e-12)
    for s in d.edges:
        assert s.min() >= 0.0 and s.max() <= 1.0
