"""One level of the orthonormal 2-D Haar transform (pywavelets' ``'haar'`` layout), torch reference.

For each 2×2 block ``[[a, b], [c, d]]``::

    A = (a + b + c + d) / 2    H = (a + b - c - d) / 2
    V = (a - b + c - d) / 2    D = (a - b - c + d) / 2

which is exactly ``pywt.dwt2(x, 'haar')`` (checked in tests). :func:`haar_level` and
:func:`ihaar_level` run a Triton kernel on CUDA tensors (when Triton imports; not for float64, and
not when ``kernels.force_reference`` asks for torch everywhere), the torch reference otherwise.
The transform is orthonormal, so its adjoint is its inverse: the kernels' backward passes are the
opposite kernels (``_HaarFn`` / ``_IHaarFn``), and training through them needs no saved tensors.
"""

from __future__ import annotations

import functools

import torch

from coarse2fine.train.kernels import use_kernel
from coarse2fine.train.kernels.nearest_code import _on


def haar_level(x_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, C, h, w)`` → ``(A (B, C, h/2, w/2), HVD (B, 3C, h/2, w/2))``, HVD = [H | V | D]."""
    assert x_BChw.shape[-1] % 2 == 0 and x_BChw.shape[-2] % 2 == 0, f"odd size {tuple(x_BChw.shape)}"
    return _HaarFn.apply(x_BChw) if x_BChw.dim() == 4 and use_kernel(x_BChw) else haar_level_reference(x_BChw)


def ihaar_level(approx_BChw: torch.Tensor, hvd_B3Chw: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_level`: ``(B, C, h, w)`` and ``(B, 3C, h, w)`` → ``(B, C, 2h, 2w)``."""
    if approx_BChw.dim() == 4 and use_kernel(approx_BChw, hvd_B3Chw):
        return _IHaarFn.apply(approx_BChw, hvd_B3Chw)
    return ihaar_level_reference(approx_BChw, hvd_B3Chw)


def haar_level_reference(x_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`haar_level`."""
    a, b = x_BChw[..., 0::2, 0::2], x_BChw[..., 0::2, 1::2]
    c, d = x_BChw[..., 1::2, 0::2], x_BChw[..., 1::2, 1::2]
    approx = (a + b + c + d) * 0.5
    hvd = torch.cat([(a + b - c - d) * 0.5, (a - b + c - d) * 0.5, (a - b - c + d) * 0.5], dim=1)
    return approx, hvd


def ihaar_level_reference(approx_BChw: torch.Tensor, hvd_B3Chw: torch.Tensor) -> torch.Tensor:
    """The torch reference of :func:`ihaar_level`."""
    h_, v_, d_ = hvd_B3Chw.chunk(3, dim=1)
    A = approx_BChw
    B, C, h, w = A.shape
    out = A.new_empty(B, C, 2 * h, 2 * w)
    out[..., 0::2, 0::2] = (A + h_ + v_ + d_) * 0.5
    out[..., 0::2, 1::2] = (A + h_ - v_ - d_) * 0.5
    out[..., 1::2, 0::2] = (A - h_ + v_ - d_) * 0.5
    out[..., 1::2, 1::2] = (A - h_ - v_ + d_) * 0.5
    return out


BLOCK = 1024  # output pixels per program (a memory-bound elementwise op)


def haar_level_triton(x_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel of :func:`haar_level` (on CPU only under ``TRITON_INTERPRET=1``)."""
    import triton

    x = x_BChw.contiguous()
    B, C, h, w = x.shape
    approx = x.new_empty(B, C, h // 2, w // 2)
    hvd = x.new_empty(B, 3 * C, h // 2, w // 2)
    n = approx.numel()
    with _on(x.device):
        _kernels()[0][(triton.cdiv(n, BLOCK),)](x, approx, hvd, n, C, h // 2, w // 2, BLOCK=BLOCK)
    return approx, hvd


def ihaar_level_triton(approx_BChw: torch.Tensor, hvd_B3Chw: torch.Tensor) -> torch.Tensor:
    """The Triton kernel of :func:`ihaar_level`."""
    import triton

    dtype = torch.promote_types(approx_BChw.dtype, hvd_B3Chw.dtype)  # as the reference's arithmetic
    a, hvd = approx_BChw.to(dtype).contiguous(), hvd_B3Chw.to(dtype).contiguous()
    B, C, h, w = a.shape
    out = a.new_empty(B, C, 2 * h, 2 * w)
    n = a.numel()
    with _on(a.device):
        _kernels()[1][(triton.cdiv(n, BLOCK),)](a, hvd, out, n, C, h, w, BLOCK=BLOCK)
    return out


class _HaarFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return haar_level_triton(x)

    @staticmethod
    def backward(ctx, grad_approx, grad_hvd):  # adjoint of an orthonormal map = its inverse
        return ihaar_level_triton(grad_approx, grad_hvd)


class _IHaarFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, approx, hvd):
        return ihaar_level_triton(approx, hvd)

    @staticmethod
    def backward(ctx, grad_out):
        return haar_level_triton(grad_out)


@functools.cache
def _kernels():
    """(forward, inverse) kernels, decorated on first use (``TRITON_INTERPRET`` is read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward(x_ptr, a_ptr, hvd_ptr, n, C, h2, w2, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat index into A (B, C, h2, w2)
        m = i < n
        bc, rem = i // (h2 * w2), i % (h2 * w2)
        y, x = rem // w2, rem % w2
        top = bc * (4 * h2 * w2) + (2 * y) * (2 * w2) + 2 * x  # the 2×2 block's top-left in x
        a = tl.load(x_ptr + top, mask=m)
        b = tl.load(x_ptr + top + 1, mask=m)
        c = tl.load(x_ptr + top + 2 * w2, mask=m)
        d = tl.load(x_ptr + top + 2 * w2 + 1, mask=m)
        tl.store(a_ptr + i, (a + b + c + d) * 0.5, mask=m)
        band = ((bc // C) * 3 * C + bc % C) * (h2 * w2) + rem  # H of this channel; V, D are C channels on
        tl.store(hvd_ptr + band, (a + b - c - d) * 0.5, mask=m)
        tl.store(hvd_ptr + band + C * h2 * w2, (a - b + c - d) * 0.5, mask=m)
        tl.store(hvd_ptr + band + 2 * C * h2 * w2, (a - b - c + d) * 0.5, mask=m)

    @triton.jit
    def inverse(a_ptr, hvd_ptr, out_ptr, n, C, h, w, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat index into A (B, C, h, w)
        m = i < n
        bc, rem = i // (h * w), i % (h * w)
        y, x = rem // w, rem % w
        band = ((bc // C) * 3 * C + bc % C) * (h * w) + rem
        A = tl.load(a_ptr + i, mask=m)
        H = tl.load(hvd_ptr + band, mask=m)
        V = tl.load(hvd_ptr + band + C * h * w, mask=m)
        D = tl.load(hvd_ptr + band + 2 * C * h * w, mask=m)
        top = bc * (4 * h * w) + (2 * y) * (2 * w) + 2 * x
        tl.store(out_ptr + top, (A + H + V + D) * 0.5, mask=m)
        tl.store(out_ptr + top + 1, (A + H - V - D) * 0.5, mask=m)
        tl.store(out_ptr + top + 2 * w, (A - H + V - D) * 0.5, mask=m)
        tl.store(out_ptr + top + 2 * w + 1, (A - H - V + D) * 0.5, mask=m)

    return forward, inverse
