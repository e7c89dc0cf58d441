"""Hierarchical base/detail decomposition by Ambrosio–Tortorelli minimisation (CART seed, eq. 8–10).

Eq. 8 of the CART seed (vectorial Mumford–Shah in the Ambrosio–Tortorelli form)::

    E(u, s) = ∫ |u - f|² + α ∫ (1 - s)² |∇u|² + λ ∫ (ε |∇s|² + s² / (4ε))

with ``s ≈ 1`` on edges and ``s ≈ 0`` in smooth regions, minimised by alternating exact
minimisation over ``u`` (with ``s`` fixed) and ``s`` (with ``u`` fixed). Both sub-problems are
symmetric positive-definite linear systems, solved matrix-free by Jacobi-preconditioned
conjugate gradients, vectorised over colour channels (one CG per channel, same operator).

Units (the seed gives α=10, λ=0.01 but no units, ε or discretisation; this is the convention
chosen here, measured in ``benchmarks/RESULTS.md``):

* intensities are in [0, 1] and lengths in pixels (grid spacing 1), so √α ≈ 3.2 px is the
  smoothing length inside a region;
* ε is in pixels and defaults to 0.02 (the Γ-convergence regime ε → 0 of the AT approximation:
  the edge band is narrower than a pixel). Away from the ε|∇s|² coupling the s-step gives
  ``s = α|∇u|² / (α|∇u|² + λ/(4ε))``, so a pixel is an edge (s > 0.5) where the smoothed gradient
  exceeds ``sqrt(λ / (4 α ε))`` = 0.11 per pixel (≈ 29 grey levels) for the defaults;
* the alternation starts with the u-step from ``s = 0`` (smooth first, then find edges).

With these defaults the base is piecewise smooth with edges on a small fraction of the pixels
(first layer on demo crops: 1–21%, mostly 5–9%; the first layer removes ~40% of the total
variation); ε = 1 px instead marks 60–95% of pixels as edges and barely smooths (the threshold
drops to 0.016 per pixel), and a unit-square domain (h = 1/N) flattens the image completely
(α/h² is enormous). ``max_outer=10`` rounds is a budget, not convergence: the energy still falls
~1% per round at round 10 (``benchmarks/RESULTS.md``).

Discretisation: forward differences with Neumann boundary (zero difference across the border);
``s`` lives on pixels and weights the forward differences leaving its pixel. The discrete energy
below is exactly the one both sub-steps minimise, so with warm-started CG (which never increases a
convex quadratic from its starting point) the energy is non-increasing across outer iterations.

The decomposition of order n (eq. 10) applies the smoother recursively:
``B_0 = I``, ``B_k = AT(B_{k-1})``, ``D_k = B_{k-1} - B_k``, so ``I = B_n + D_n + … + D_1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Array = np.ndarray


def _grad(u_CHW: Array) -> tuple[Array, Array]:
    """Forward differences along x and y, zero across the last column/row (Neumann)."""
    dx = np.zeros_like(u_CHW)
    dy = np.zeros_like(u_CHW)
    dx[..., :, :-1] = u_CHW[..., :, 1:] - u_CHW[..., :, :-1]
    dy[..., :-1, :] = u_CHW[..., 1:, :] - u_CHW[..., :-1, :]
    return dx, dy


def _grad_adjoint(px: Array, py: Array) -> Array:
    """Adjoint of :func:`_grad` (a negative divergence)."""
    out = np.zeros_like(px)
    out[..., :, :-1] -= px[..., :, :-1]
    out[..., :, 1:] += px[..., :, :-1]
    out[..., :-1, :] -= py[..., :-1, :]
    out[..., 1:, :] += py[..., :-1, :]
    return out


def _pair_sum(w: Array) -> Array:
    """Diagonal of ``gradᵀ diag(w) grad``: each forward difference adds its weight to both ends."""
    d = np.zeros_like(w)
    d[..., :, :-1] += w[..., :, :-1]
    d[..., :, 1:] += w[..., :, :-1]
    d[..., :-1, :] += w[..., :-1, :]
    d[..., 1:, :] += w[..., :-1, :]
    return d


def _pcg(
    apply_a: Callable[[Array], Array], b: Array, x0: Array, diag: Array, tol: float, maxiter: int
) -> tuple[Array, int, float]:
    """Jacobi-preconditioned CG on a batch of independent systems (leading axis = batch).

    Returns the solution, the iterations run and the largest relative residual ‖b - Ax‖ / ‖b‖.
    """
    axes = tuple(range(1, b.ndim))
    shape = (-1,) + (1,) * (b.ndim - 1)
    x = x0.copy()
    r = b - apply_a(x)
    b_norm = np.maximum(np.sqrt((b * b).sum(axis=axes)), 1e-30)
    z = r / diag
    p = z.copy()
    rz = (r * z).sum(axis=axes)
    it = 0
    rel = np.sqrt((r * r).sum(axis=axes)) / b_norm
    while it < maxiter and rel.max() > tol:
        ap = apply_a(p)
        pap = (p * ap).sum(axis=axes)
        alpha = np.where(pap > 0, rz / np.where(pap > 0, pap, 1.0), 0.0)
        x += alpha.reshape(shape) * p
        r -= alpha.reshape(shape) * ap
        z = r / diag
        rz_new = (r * z).sum(axis=axes)
        beta = np.where(rz > 0, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta.reshape(shape) * p
        rz = rz_new
        rel = np.sqrt((r * r).sum(axis=axes)) / b_norm
        it += 1
    return x, it, float(rel.max())


@dataclass(frozen=True)
class ATParams:
    """User-facing knobs of eq. 8 (defaults from the CART seed, section 4: α=10, λ=0.01).

    ``epsilon`` is in pixels (see module docstring); ``max_outer``/``outer_tol`` bound the
    alternating minimisation, ``cg_tol``/``cg_maxiter`` each linear solve.
    """

    alpha: float = 10.0
    lambda_: float = 0.01
    epsilon: float = 0.02
    max_outer: int = 10
    outer_tol: float = 1e-3
    cg_tol: float = 1e-4
    cg_maxiter: int = 500

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.lambda_ <= 0 or self.epsilon <= 0:
            raise ValueError("alpha, lambda_ and epsilon must be positive")
        if self.max_outer < 1 or self.cg_maxiter < 1:
            raise ValueError("max_outer and cg_maxiter must be at least 1")


@dataclass
class ATResult:
    """One AT solve: the smooth image ``u`` (C,H,W), edge map ``s`` (H,W) and solver trace."""

    u: Array
    s: Array
    energies: list[float] = field(default_factory=list)
    cg_iterations: int = 0
    outer_iterations: int = 0
    residual: float = 0.0


class _ATProblem:
    """Discrete eq. 8 for one image ``f`` (C,H,W) in pixel units."""

    def __init__(self, f_CHW: Array, p: ATParams) -> None:
        assert f_CHW.ndim == 3, f"expected (C,H,W), got {f_CHW.shape}"
        self.f = f_CHW
        self.a = p.alpha  # α (1-s)² |∇u|²
        self.b = p.lambda_ / (4.0 * p.epsilon)  # λ s² / (4ε)
        self.c = p.lambda_ * p.epsilon  # λ ε |∇s|²
        self.p = p

    def grad_sq(self, u: Array) -> Array:
        dx, dy = _grad(u)
        return (dx * dx + dy * dy).sum(axis=0)  # (H, W), summed over channels (vectorial MS)

    def energy(self, u: Array, s: Array) -> float:
        """Discrete E(u, s) per pixel."""
        dsx, dsy = _grad(s[None])
        e = ((u - self.f) ** 2).sum()
        e += self.a * ((1.0 - s) ** 2 * self.grad_sq(u)).sum()
        e += self.c * (dsx**2 + dsy**2).sum() + self.b * (s**2).sum()
        return float(e / s.size)

    def solve_u(self, u: Array, s: Array) -> tuple[Array, int, float]:
        """argmin_u: (I + a gradᵀ diag((1-s)²) grad) u = f, one CG per channel."""
        w = (1.0 - s) ** 2  # (H, W), shared by all channels

        def apply_a(x: Array) -> Array:
            dx, dy = _grad(x)
            return x + self.a * _grad_adjoint(w * dx, w * dy)

        diag = np.broadcast_to(1.0 + self.a * _pair_sum(w), u.shape)
        return _pcg(apply_a, self.f, u, diag, self.p.cg_tol, self.p.cg_maxiter)

    def solve_s(self, u: Array, s: Array) -> tuple[Array, int, float]:
        """argmin_s: (diag(a g + b) + c gradᵀ grad) s = a g, with g = |∇u|²."""
        ag = self.a * self.grad_sq(u)[None]  # (1, H, W)

        def apply_a(x: Array) -> Array:
            dx, dy = _grad(x)
            return (ag + self.b) * x + self.c * _grad_adjoint(dx, dy)

        diag = ag + self.b + self.c * _pair_sum(np.ones_like(ag))
        s_new, it, res = _pcg(apply_a, ag, s[None], diag, self.p.cg_tol, self.p.cg_maxiter)
        # The exact minimiser lies in [0, 1] (M-matrix, 0 <= rhs <= diag); clip CG round-off.
        return np.clip(s_new[0], 0.0, 1.0), it, res


def ambrosio_tortorelli(f_CHW: Array, params: ATParams = ATParams()) -> ATResult:
    """Minimise eq. 8 for one image by alternating u- and s-steps (float64 internally).

    Starts from ``u = f, s = 0`` and stops when the relative change of ``u`` falls below
    ``params.outer_tol`` or after ``params.max_outer`` rounds. Deterministic.
    """
    prob = _ATProblem(np.asarray(f_CHW, dtype=np.float64), params)
    u = prob.f.copy()
    s = np.zeros(prob.f.shape[1:], dtype=np.float64)
    result = ATResult(u=u, s=s, energies=[prob.energy(u, s)])
    for _ in range(params.max_outer):
        u_new, it_u, res_u = prob.solve_u(u, s)
        s, it_s, _ = prob.solve_s(u_new, s)
        change = np.sqrt(((u_new - u) ** 2).sum() / max((u * u).sum(), 1e-30))
        u = u_new
        result.energies.append(prob.energy(u, s))
        result.cg_iterations += it_s + it_u
        result.outer_iterations += 1
        result.residual = res_u
        if change < params.outer_tol:
            break
    result.u, result.s = u, s
    return result


def total_variation(x_CHW: Array) -> float:
    """Anisotropic total variation Σ|∂x| + |∂y| per pixel (what the dataset reports per layer)."""
    dx, dy = _grad(np.asarray(x_CHW, dtype=np.float64))
    return float((np.abs(dx) + np.abs(dy)).sum() / x_CHW[0].size)


@dataclass
class Decomposition:
    """Order-n decomposition ``I = B_n + D_n + … + D_1`` (eq. 10) with per-layer diagnostics.

    ``details[k-1]`` is ``D_k`` and ``edges[k-1]`` the edge map of the k-th smoothing.
    """

    base: Array
    details: list[Array]
    edges: list[Array]
    iterations: list[int]
    residuals: list[float]
    edge_fraction: list[float]
    tv_reduction: list[float]


def decompose(image_CHW: Array, order: int = 3, params: ATParams = ATParams()) -> Decomposition:
    """Hierarchical base/detail decomposition (CART section 3.1): B_k = AT(B_{k-1}), D_k = B_{k-1} - B_k.

    ``edge_fraction`` is the share of pixels with s > 0.5; ``tv_reduction`` is
    ``1 - TV(B_k) / TV(B_{k-1})``.
    """
    assert order >= 1, "order must be at least 1"
    prev = np.asarray(image_CHW, dtype=np.float64)
    details, edges, iters, residuals, fractions, tv_red = [], [], [], [], [], []
    for _ in range(order):
        res = ambrosio_tortorelli(prev, params)
        details.append(prev - res.u)
        edges.append(res.s)
        iters.append(res.cg_iterations)
        residuals.append(res.residual)
        fractions.append(float((res.s > 0.5).mean()))
        tv_prev = total_variation(prev)
        tv_red.append(1.0 - total_variation(res.u) / tv_prev if tv_prev > 0 else 0.0)
        prev = res.u
    return Decomposition(prev, details, edges, iters, residuals, fractions, tv_red)
