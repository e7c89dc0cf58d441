"""AT decomposition benchmark: our matrix-free Jacobi-PCG solver vs a sparse direct reference.

    python benchmarks/bench_decomposition.py [--n64 4] [--n256 2] [--order 3] [--seed 0] [--cg-tol T]

Per resolution (64×64 and 256×256 RGB demo crops in [0, 1], float64), order-3 decomposition with
the default ``ATParams``:

* ours: ``mumford_shah.decompose``;
* reference: the same discrete linear systems assembled as ``scipy.sparse`` matrices (forward
  differences, Neumann boundary, exactly as ``_grad``) and solved by ``spsolve`` (SuperLU), with
  the same alternation and stopping rule (start u = f, s = 0; u-step, s-step; stop when
  ‖u_new - u‖ / ‖u‖ < outer_tol or after max_outer rounds; B_k = AT(B_{k-1}), D_k = B_{k-1} - B_k).

Reports mean seconds per image (time.perf_counter, one warm-up image per method first), the time
ratio reference / ours, the max abs difference of base, details and edge maps, and the outer
iterations per layer and our edge fractions (s > 0.5). ``--cg-tol`` overrides ``ATParams.cg_tol`` (with
``cg_maxiter`` raised to 5000) to show how the difference to the direct solve shrinks with
it. BLAS thread env vars (OPENBLAS_NUM_THREADS, ...) are left as they are.
Waits for an idle machine first and reports the CPU other processes used meanwhile (cpu_load.py).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

from cpu_load import Load, wait_idle

from coarse2fine.preprocess import mumford_shah as ms
from coarse2fine.preprocess.demo_data import demo_crops


def crops(n: int, res: int, seed: int) -> list[np.ndarray]:
    """n demo crops as float64 (3, H, W) in [0, 1]."""
    return [np.asarray(c, np.float64).transpose(2, 0, 1) / 255.0 for _, c in demo_crops(n, res, seed)]


# ---------------------------------------------------------------- reference


def forward_diff_matrix(h: int, w: int) -> sp.csr_matrix:
    """G (2N × N): rows 0..N-1 = x forward differences, N..2N-1 = y forward differences.

    Pixel (i, j) has flat index i*w + j (C order, as ``reshape``). The difference leaving the last
    column (x) / last row (y) is zero (Neumann), exactly as ``mumford_shah._grad``.
    """

    def d1(m: int) -> sp.csr_matrix:  # m × m, row k: e_{k+1} - e_k, last row zero
        main = -np.ones(m)
        main[-1] = 0.0
        return sp.diags([main, np.ones(m - 1)], [0, 1], shape=(m, m), format="csr")

    dx = sp.kron(sp.identity(h), d1(w), format="csr")
    dy = sp.kron(d1(h), sp.identity(w), format="csr")
    return sp.vstack([dx, dy], format="csr")


class SparseAT:
    """AT alternation with both sub-steps solved exactly by sparse LU (spsolve)."""

    def __init__(self, h: int, w: int, p: ms.ATParams) -> None:
        self.h, self.w, self.n = h, w, h * w
        self.G = forward_diff_matrix(h, w)
        self.GtG = (self.G.T @ self.G).tocsc()
        self.I = sp.identity(self.n, format="csc")
        self.a = p.alpha
        self.b = p.lambda_ / (4.0 * p.epsilon)
        self.c = p.lambda_ * p.epsilon
        self.p = p

    def grad_sq(self, u_NC: np.ndarray) -> np.ndarray:  # (N,), summed over channels
        d = self.G @ u_NC  # (2N, C)
        return (d[: self.n] ** 2 + d[self.n :] ** 2).sum(axis=1)

    def solve_u(self, f_NC: np.ndarray, s: np.ndarray) -> np.ndarray:
        wt = (1.0 - s) ** 2
        W = sp.diags(np.concatenate([wt, wt]))
        A = (self.I + self.a * (self.G.T @ W @ self.G)).tocsc()
        return np.asarray(spsolve(A, f_NC)).reshape(self.n, -1)  # one factorisation, C rhs

    def solve_s(self, u_NC: np.ndarray) -> np.ndarray:
        ag = self.a * self.grad_sq(u_NC)
        A = (sp.diags(ag + self.b) + self.c * self.GtG).tocsc()
        return np.clip(spsolve(A, ag), 0.0, 1.0)  # same clip as the library (no-op up to round-off)

    def run(self, f_CHW: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        c = f_CHW.shape[0]
        f = f_CHW.reshape(c, self.n).T.copy()  # (N, C)
        u, s = f.copy(), np.zeros(self.n)
        rounds = 0
        for _ in range(self.p.max_outer):
            u_new = self.solve_u(f, s)
            s = self.solve_s(u_new)
            change = np.sqrt(((u_new - u) ** 2).sum() / max((u * u).sum(), 1e-30))
            u = u_new
            rounds += 1
            if change < self.p.outer_tol:
                break
        return u.T.reshape(c, self.h, self.w), s.reshape(self.h, self.w), rounds


def reference_decompose(img_CHW: np.ndarray, order: int, p: ms.ATParams):
    _, h, w = img_CHW.shape
    at = SparseAT(h, w, p)  # assembled per image (part of the timed work, like ours)
    prev = img_CHW
    details, edges, rounds = [], [], []
    for _ in range(order):
        u, s, r = at.run(prev)
        details.append(prev - u)
        edges.append(s)
        rounds.append(r)
        prev = u
    return prev, details, edges, rounds


def our_rounds(img_CHW: np.ndarray, order: int, p: ms.ATParams) -> list[int]:
    """Outer iterations per layer of our solver (untimed; same recursion as ``decompose``)."""
    prev, rounds = img_CHW, []
    for _ in range(order):
        r = ms.ambrosio_tortorelli(prev, p)
        rounds.append(r.outer_iterations)
        prev = r.u
    return rounds


# ---------------------------------------------------------------- benchmark


def bench(imgs: list[np.ndarray], order: int, p: ms.ATParams) -> dict:
    ms.decompose(imgs[0], order, p)  # warm-up
    reference_decompose(imgs[0], order, p)
    t_ours, t_ref = [], []
    d_base = d_det = d_edge = 0.0
    r_ours, r_ref, frac = [], [], []
    for img in imgs:
        t = time.perf_counter()
        ours = ms.decompose(img, order, p)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        base, details, edges, rounds = reference_decompose(img, order, p)
        t_ref.append(time.perf_counter() - t)
        d_base = max(d_base, float(np.abs(ours.base - base).max()))
        d_det = max(d_det, max(float(np.abs(a - b).max()) for a, b in zip(ours.details, details)))
        d_edge = max(d_edge, max(float(np.abs(a - b).max()) for a, b in zip(ours.edges, edges)))
        r_ref.append(rounds)
        frac.append([round(f, 3) for f in ours.edge_fraction])
        r_ours.append(our_rounds(img, order, p))
    return dict(ours=float(np.mean(t_ours)), ref=float(np.mean(t_ref)), base=d_base, det=d_det,
                edge=d_edge, r_ours=r_ours, r_ref=r_ref, frac=frac)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n64", type=int, default=4, help="images at 64×64")
    ap.add_argument("--n256", type=int, default=2, help="images at 256×256")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cg-tol", type=float, default=None, help="override ATParams.cg_tol")
    ap.add_argument("--max-wait", type=float, default=1800.0, help="longest wait (s) for an idle machine")
    args = ap.parse_args()
    p = ms.ATParams() if args.cg_tol is None else ms.ATParams(cg_tol=args.cg_tol, cg_maxiter=5000)
    blas = {k: os.environ.get(k, "unset") for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    print(f"# AT decomposition, order {args.order}, {p}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {__import__('scipy').__version__}, "
          f"cpus {os.cpu_count()}, env {blas} (left as is)\n")
    rows = []
    for res, n in ((64, args.n64), (256, args.n256)):
        if n < 1:
            continue
        imgs = crops(n, res, args.seed)
        print(f"{res}x{res}: waited {wait_idle(max_wait_s=args.max_wait):.0f}s for an idle machine", flush=True)
        with Load() as load:
            r = bench(imgs, args.order, p)
        r["load"] = load
        rows.append((res, n, r))
        print(f"{res}x{res}: {load}", flush=True)
        print(f"{res}x{res}: outer rounds per layer, ours {r['r_ours']}, reference {r['r_ref']}; "
              f"our edge fractions {r['frac']}", flush=True)
    print()
    print("| resolution | images | ours s/img | reference s/img | ratio ref/ours | max|Δ base| | max|Δ details| | max|Δ edges| | other CPU s / wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res, n, r in rows:
        print(f"| {res}×{res} | {n} | {r['ours']:.3f} | {r['ref']:.3f} | {r['ref'] / r['ours']:.2f} | "
              f"{r['base']:.2e} | {r['det']:.2e} | {r['edge']:.2e} | {r['load'].other:.1f} / {r['load'].wall:.1f} |")


if __name__ == "__main__":
    main()
