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
    assert (p.epsilon, p.max_outer, p.cg_maxiter) == (0.02, 10, 500)  # the module docstring's convention and budget
    d = decompose(photo(64))
    assert len(d.details) == 3  # the demo's order (CART: D_3, D_2, D_1)
    assert all(0.0 < f < 0.35 for f in d.edge_fraction), d.edge_fraction
    assert d.tv_reduction[0] > 0.2, d.tv_reduction


@pytest.mark.parametrize("bad", [{"alpha": 0}, {"alpha": -1}, {"lambda_": 0}, {"lambda_": -0.5}, {"epsilon": 0},
                                 {"max_outer": 0}, {"cg_maxiter": 0}])
def test_invalid_params_rejected_and_the_smallest_valid_ones_accepted(bad):
    with pytest.raises(ValueError):
        ATParams(**bad)
    ATParams(alpha=0.5, lambda_=1e-9, epsilon=1e-9, max_outer=1, cg_maxiter=1)
    for shape in [(1, 3, 4, 4), (4, 4)]:  # a batch, a grey image without its channel axis
        with pytest.raises(AssertionError, match="expected"):
            ambrosio_tortorelli(np.zeros(shape))


def test_alternation_stops_at_the_first_round_whose_change_is_below_tolerance():
    """The stopping rule, against rounds run one budget at a time: stop after round k, the first
    with ‖u_k − u_{k−1}‖ / ‖u_{k−1}‖ < outer_tol (u_0 = f), and count k rounds."""
    f = step_image(16)
    us = [f] + [ambrosio_tortorelli(f, ATParams(max_outer=k, outer_tol=0.0)).u for k in range(1, 9)]
    change = [np.linalg.norm(us[k] - us[k - 1]) / np.linalg.norm(us[k - 1]) for k in range(1, 9)]
    tol = float(np.sort(change)[3] * 1.001)  # a tolerance that the change crosses within the budget
    want = 1 + next(k for k, c in enumerate(change) if c < tol)
    r = ambrosio_tortorelli(f, ATParams(max_outer=8, outer_tol=tol))
    assert r.outer_iterations == want < 8
    np.testing.assert_array_equal(r.u, us[want])
    assert len(r.energies) == want + 1


def test_a_flat_image_has_no_edges_and_no_tv_reduction():
    d = decompose(np.full((3, 8, 8), 0.4), 2)
    assert d.tv_reduction == [0.0, 0.0] and d.edge_fraction == [0.0, 0.0]
    np.testing.assert_allclose(d.base, 0.4, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), order=st.integers(1, 3))
def test_property_exact_sum_and_bounds(seed, order):
    x = np.random.default_rng(seed).random((3, 12, 12))
    d = decompose(x, order, ATParams(max_outer=3))
    np.testing.assert_allclose(d.base + sum(d.details), x, atol=1e-12)
    for s in d.edges:
        assert s.min() >= 0.0 and s.max() <= 1.0


# ---------------------------------------------------------------- each step against eq. 8 itself


def eq8(u, s, f, p: ATParams):
    """The CART seed's eq. 8, written directly in torch (forward differences, zero across the
    last row/column; ``s`` on pixels weighs the differences leaving its pixel), summed over pixels."""
    import torch.nn.functional as F

    def grad(x):
        return F.pad(x.diff(dim=-1), (0, 1)), F.pad(x.diff(dim=-2), (0, 0, 0, 1))

    ux, uy = grad(u)
    sx, sy = grad(s)
    return (((u - f) ** 2).sum() + p.alpha * ((1 - s) ** 2 * (ux ** 2 + uy ** 2).sum(0)).sum()
            + p.lambda_ * (p.epsilon * (sx ** 2 + sy ** 2).sum() + (s ** 2).sum() / (4 * p.epsilon)))


def eq8_grad(u, s, f, p: ATParams, wrt: str) -> float:
    """‖∂E/∂u‖ or ‖∂E/∂s‖ at (u, s), by autograd of :func:`eq8`."""
    import torch

    u, s, f = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (u, s, f))
    eq8(u, s, f, p).backward()
    return float({"u": u, "s": s}[wrt].grad.norm())


def test_each_step_is_the_exact_minimiser_of_eq8():
    """Round 1: u₁ = argmin_u E(u, 0), s₁ = argmin_s E(u₁, s); round 2: u₂ = argmin_u E(u, s₁).
    Each must be a stationary point of eq. 8 (the sub-problems are convex quadratics), and the
    logged energies must be eq. 8 per pixel. ε = 0.5 px makes the ε|∇s|² coupling as large as
    the s²/4ε term, so a wrong sign or constant in either shows."""
    import torch

    f = np.random.default_rng(3).random((3, 6, 7))
    p = ATParams(epsilon=0.5, max_outer=1, outer_tol=0.0, cg_tol=1e-13, cg_maxiter=10_000)
    one = ambrosio_tortorelli(f, p)
    two = ambrosio_tortorelli(f, ATParams(**{**p.__dict__, "max_outer": 2}))
    zero = np.zeros(f.shape[1:])
    assert 0.05 < one.s.min() and one.s.max() < 0.95  # interior: the clip to [0, 1] is inactive
    assert eq8_grad(one.u, zero, f, p, "u") < 1e-9 * eq8_grad(f + 1, zero, f, p, "u")
    assert eq8_grad(one.u, one.s, f, p, "s") < 1e-9 * eq8_grad(one.u, zero, f, p, "s")
    assert eq8_grad(two.u, one.s, f, p, "u") < 1e-9 * eq8_grad(one.u, one.s, f, p, "u")
    energy = [float(eq8(*(torch.tensor(a) for a in (u, s, f)), p)) / zero.size
              for u, s in ((f, zero), (one.u, one.s))]
    np.testing.assert_allclose(one.energies, energy, rtol=1e-12)
    assert one.cg_iterations >= 2 * one.outer_iterations  # a u-solve and an s-solve per round


def test_jacobi_pcg_takes_as_many_iterations_as_scipy():
    """The u- and s-solves of round 1 against scipy's CG with the same Jacobi preconditioner, on
    the systems autograd takes from eq. 8 (Hessian, and the gradient at the start): same
    iteration counts, so the preconditioner is the Jacobi one and nothing else."""
    import scipy.sparse.linalg as sla
    import torch

    f = np.random.default_rng(4).random((2, 5, 6))
    p = ATParams(epsilon=0.5, max_outer=1, outer_tol=0.0, cg_tol=1e-8)
    r = ambrosio_tortorelli(f, p)
    ft, zero = torch.tensor(f), torch.zeros(f.shape[1:], dtype=torch.float64)

    def cg_iterations(energy, x0: np.ndarray) -> int:
        x0_t = torch.tensor(x0)
        hess = torch.autograd.functional.hessian(energy, x0_t).reshape(x0.size, x0.size).numpy()
        rhs = hess @ x0.ravel() - torch.autograd.functional.jacobian(energy, x0_t).numpy().ravel()
        count = []
        sla.cg(hess, rhs, x0=x0.ravel(), rtol=p.cg_tol, atol=0.0, M=np.diag(1 / np.diag(hess)),
               callback=lambda _: count.append(1))
        return len(count)

    # the u-system is one CG per channel, run together until the worst channel converges
    u_its = max(cg_iterations(lambda u, c=c: eq8(u[None], zero, ft[c:c + 1], p), f[c]) for c in range(2))
    s_its = cg_iterations(lambda s: eq8(torch.tensor(r.u), s, ft, p), np.zeros(f.shape[1:]))
    assert abs(r.cg_iterations - (u_its + s_its)) <= 1, (r.cg_iterations, u_its, s_its)


def test_decomposition_diagnostics_against_direct_computations():
    x = photo(24)
    d = decompose(x, 2, ATParams(max_outer=3))

    def tv(a):  # anisotropic total variation per pixel
        return (np.abs(np.diff(a, axis=-1)).sum() + np.abs(np.diff(a, axis=-2)).sum()) / a[0].size

    layers = [x, x - d.details[0], d.base]  # B_0, B_1, B_2
    for k in range(2):
        assert d.tv_reduction[k] == pytest.approx(1 - tv(layers[k + 1]) / tv(layers[k]), rel=1e-9)
        assert d.edge_fraction[k] == pytest.approx(float((d.edges[k] > 0.5).mean()))
    assert total_variation(x) == pytest.approx(tv(x), rel=1e-12)
