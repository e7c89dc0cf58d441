"""Nearest-code search: the distance and its argmin fused, without the (N, K) distance matrix.

``nearest_code(z_ND, codes_KD, metric)`` → indices (N,) of

* ``"euclidean"``: argmin_k ‖z − c_k‖² = argmin_k (‖c_k‖² − 2 z·c_k) (‖z‖² is the same for every k;
  VQ-VAE / CQ seed eq. 2: CQ, CART, the spatial VQ baselines);
* ``"cosine"``: argmax_k z·c_k for l2-normalised z and codes (SIT's factorised codes, §4.1).

Two implementations behind this one function: the torch reference (fp32 matmul + argmin, any device)
and a Triton kernel (one program per ``BLOCK_N`` rows; tiles of ``BLOCK_K`` codes × ``BLOCK_D``
dimensions accumulate the dot products in fp32 with IEEE precision — no TF32 — and a running best
value and index per row, so memory is O(N + K) whatever K is: K = 65,536 codes of CQ's long
vectors never materialise N × K). The kernel runs where it helps (``kernels.use_kernel``: CUDA
tensors, Triton importable) unless ``kernels.force_reference`` asks for torch. Ties go to the lowest index in both (torch's
argmin; the kernel updates only on a strictly better tile and takes each tile's first minimum). The
CPU tests run the kernel under ``TRITON_INTERPRET=1``: the kernel is decorated on first use, so that
setting is read then, not at import.
"""

# no `from __future__ import annotations`: Triton reads constexpr parameters from their annotation objects

import functools

import torch

from coarse2fine.train.kernels import use_kernel

METRICS = ("euclidean", "cosine")
# Measured on an H100 (benchmarks/RESULTS.md, "nearest-code tile sweep"): for code vectors up to
# SHORT_CODES dims the kernel (64×128 tiles) is up to 2× faster than cuBLAS's fp32 matmul + argmin;
# for longer ones (CQ's H1·W1 = 256) the matmul is 2.4× faster, so the kernel serves them only when
# the reference's (N, K) fp32 scores would take more than MAX_SCORES_BYTES (where memory, not
# speed, decides: 1 GiB, against the kernel's O(N + K)).
SHORT_CODES = 64
MAX_SCORES_BYTES = 2**30


def nearest_code_reference(z_ND: torch.Tensor, codes_KD: torch.Tensor, metric: str) -> torch.Tensor:
    """The torch reference: scores (N, K) in at least fp32 (bf16 would blur near ties), then argmin."""
    dtype = torch.promote_types(z_ND.dtype, torch.float32)
    z, c = z_ND.to(dtype), codes_KD.to(dtype)
    dots = z @ c.t()  # (N, K)
    score = c.pow(2).sum(-1) - 2 * dots if metric == "euclidean" else -dots
    return score.argmin(-1)


def nearest_code(z_ND: torch.Tensor, codes_KD: torch.Tensor, metric: str) -> torch.Tensor:
    """Indices (N,) of the nearest codes (module docstring): the Triton kernel for fp32/bf16/fp16
    CUDA tensors when Triton imports and it is the better choice (``SHORT_CODES``), else (or when
    forced) the reference."""
    assert metric in METRICS, f"metric must be one of {METRICS}, not {metric!r}"
    assert z_ND.dim() == 2 and codes_KD.dim() == 2 and z_ND.shape[1] == codes_KD.shape[1], (z_ND.shape, codes_KD.shape)
    (N, D), K = z_ND.shape, codes_KD.shape[0]
    if not use_kernel(z_ND, codes_KD) or (D > SHORT_CODES and 4 * N * K <= MAX_SCORES_BYTES):
        return nearest_code_reference(z_ND, codes_KD, metric)
    return nearest_code_triton(z_ND, codes_KD, metric)


def nearest_code_triton(z_ND: torch.Tensor, codes_KD: torch.Tensor, metric: str,
                        block_n: int | None = None, block_k: int = 128, block_d: int = 32, num_warps: int = 4
                        ) -> torch.Tensor:
    """The Triton kernel (any device Triton runs on; on CPU only under ``TRITON_INTERPRET=1``). The
    tiles and ``num_warps`` default to the H100 sweep's best (``benchmarks/bench_kernels.py --sweep``):
    128 codes × 32 dims, 4 warps, 64 rows for short codes and 32 for long ones."""
    if block_n is None:
        block_n = 64 if z_ND.shape[1] <= SHORT_CODES else 32
    return _nearest_op(z_ND.float(), codes_KD.float(), metric == "euclidean", block_n, block_k, block_d, num_warps)


def _on(device: torch.device):
    """Launch on the tensors' GPU, not the current one (a no-op context elsewhere)."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.triton_op("coarse2fine::nearest_code", mutates_args=())
def _nearest_op(z: torch.Tensor, c: torch.Tensor, euclidean: bool, block_n: int, block_k: int, block_d: int,
                num_warps: int) -> torch.Tensor:
    """The kernel as an operator, so ``torch.compile`` traces into it (registered at import like any
    ``torch.library`` op; the kernel itself is decorated on first run)."""
    import triton
    from torch.library import wrap_triton

    z, c = z.contiguous(), c.contiguous()
    (N, D), K = z.shape, c.shape[0]
    assert K > 0, "an empty codebook"
    norms = c.pow(2).sum(-1)  # (K,): O(K) memory
    out = torch.empty(N, dtype=torch.int64, device=z.device)
    with _on(z.device):
        wrap_triton(_kernel())[(triton.cdiv(N, block_n),)](z, c, norms, out, N, K, D, euclidean, BLOCK_N=block_n,
                                                          BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)
    return out


@functools.cache
def _kernel():
    """Decorated on first use (so ``TRITON_INTERPRET`` is read at that moment)."""
    import triton
    import triton.language as tl

    @triton.jit
    def nearest_kernel(z_ptr, c_ptr, norm_ptr, out_ptr, N, K, D, euclidean: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_N,), tl.int64)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                z = tl.load(z_ptr + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
                c = tl.load(c_ptr + rk[None, :] * D + rd[:, None], mask=(rk[None, :] < K) & (rd[:, None] < D), other=0.0)
                dots += tl.dot(z, c, input_precision="ieee")  # (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_K)
            if euclidean:
                score = tl.load(norm_ptr + rk, mask=rk < K, other=0.0)[None, :] - 2 * dots
            else:
                score = -dots
            score = tl.where(rk[None, :] < K, score, float("inf"))
            tile_best = tl.min(score, axis=1)
            tile_i = tl.argmin(score, axis=1).to(tl.int64) + k0
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_i = tl.where(better, tile_i, best_i)
        tl.store(out_ptr + rn, best_i, mask=rn < N)

    return nearest_kernel
