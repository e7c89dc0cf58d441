"""The multi-level orthonormal 2-D Haar transform (pywavelets' ``'haar'`` layout): a torch reference
and, behind the same functions, one fused Triton kernel per direction.

``haar_dwt(x, L)`` returns ``[scale_0, scale_1, …, scale_L]``: ``scale_0`` the level-L
approximation (B, C, H/2^L, W/2^L), ``scale_s`` the H|V|D details of level L-s+1 stacked on
channels (B, 3C, …), coarse to fine — the layout of ``coarse2fine.preprocess.dwt`` (pywavelets).
``haar_idwt(scales)`` inverts it (fewer scales give a coarser image). One level, for each 2×2
block ``[[a, b], [c, d]]``::

    A = (a + b + c + d) / 2    H = (a + b - c - d) / 2
    V = (a - b + c - d) / 2    D = (a - b - c + d) / 2

which is exactly ``pywt.dwt2(x, 'haar')`` (checked in tests). The reference applies it level by
level, so every level's approximation goes to memory and is read back. The Triton kernel fuses the
levels: each program loads the 2^L × 2^L input patches under a few level-L pixels, runs every level
in registers and writes each level's details once, so the DWT reads its input once and writes its
output once (2 passes over the data instead of 8/3: the transform is memory-bound). The inverse
mirrors it.

Both run on floating-point CUDA tensors (when Triton imports; not for float64, and not when
``kernels.force_reference`` asks for torch everywhere) and are ``torch.library.triton_op``
operators, so ``torch.compile`` traces into the kernels instead of breaking the graph around them.
The transform is orthonormal, so its adjoint is its inverse: each kernel's backward is the other
kernel, with no saved tensors.
"""

# No `from __future__ import annotations` here: Triton's interpreter finds constexpr parameters by
# their annotation objects.
import functools

import torch

from coarse2fine.train.kernels import use_kernel
from coarse2fine.train.kernels.nearest_code import _on

MAX_FUSED_LEVELS = 6  # output pointers of the kernels; deeper transforms take the reference
PATCH_ELEMENTS = 2048  # input pixels per program (BLOCK_P patches of 4^L pixels; a memory-bound op)


def haar_dwt(x_BCHW: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``x (B, C, H, W)`` → ``[A_L (B, C, H/2^L, W/2^L), HVD_L (B, 3C, …), …, HVD_1 (B, 3C, H/2, W/2)]``."""
    assert x_BCHW.ndim == 4, f"expected (B, C, H, W), got {tuple(x_BCHW.shape)}"
    assert levels >= 0, f"{levels} levels"
    assert x_BCHW.shape[-1] % (1 << levels) == 0 and x_BCHW.shape[-2] % (1 << levels) == 0, (
        f"odd size {tuple(x_BCHW.shape)} at some level of {levels}")
    if 1 <= levels <= MAX_FUSED_LEVELS and x_BCHW.is_floating_point() and use_kernel(x_BCHW):
        return haar_dwt_triton(x_BCHW, levels)
    return haar_dwt_reference(x_BCHW, levels)


def haar_idwt(scales: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`haar_dwt` (any number of scales: fewer scales give a coarser image)."""
    if (2 <= len(scales) <= MAX_FUSED_LEVELS + 1 and scales[0].ndim == 4 and all(s.is_floating_point() for s in scales)
            and use_kernel(*scales)):
        return haar_idwt_triton(scales)
    return haar_idwt_reference(scales)


def haar_level_reference(x_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level: ``x (B, C, h, w)`` → ``(A (B, C, h/2, w/2), HVD (B, 3C, h/2, w/2))``, HVD = [H | V | D]."""
    assert x_BChw.shape[-1] % 2 == 0 and x_BChw.shape[-2] % 2 == 0, f"odd size {tuple(x_BChw.shape)}"
    a, b = x_BChw[..., 0::2, 0::2], x_BChw[..., 0::2, 1::2]
    c, d = x_BChw[..., 1::2, 0::2], x_BChw[..., 1::2, 1::2]
    approx = (a + b + c + d) * 0.5
    hvd = torch.cat([(a + b - c - d) * 0.5, (a - b + c - d) * 0.5, (a - b - c + d) * 0.5], dim=1)
    return approx, hvd


def ihaar_level_reference(approx_BChw: torch.Tensor, hvd_B3Chw: torch.Tensor) -> torch.Tensor:
    """Inverse of one level: ``(B, C, h, w)`` and ``(B, 3C, h, w)`` → ``(B, C, 2h, 2w)``."""
    h_, v_, d_ = hvd_B3Chw.chunk(3, dim=1)
    A = approx_BChw
    B, C, h, w = A.shape
    out = A.new_empty(B, C, 2 * h, 2 * w)
    out[..., 0::2, 0::2] = (A + h_ + v_ + d_) * 0.5
    out[..., 0::2, 1::2] = (A + h_ - v_ - d_) * 0.5
    out[..., 1::2, 0::2] = (A - h_ + v_ - d_) * 0.5
    out[..., 1::2, 1::2] = (A - h_ - v_ + d_) * 0.5
    return out


def haar_dwt_reference(x_BCHW: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The torch reference of :func:`haar_dwt`: one level at a time."""
    details, approx = [], x_BCHW
    for _ in range(levels):
        approx, hvd = haar_level_reference(approx)
        details.append(hvd)
    return [approx] + details[::-1]


def haar_idwt_reference(scales: list[torch.Tensor]) -> torch.Tensor:
    """The torch reference of :func:`haar_idwt`."""
    x = scales[0]
    for hvd in scales[1:]:
        x = ihaar_level_reference(x, hvd)
    return x


def haar_dwt_triton(x_BCHW: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The fused kernel of :func:`haar_dwt` (on CPU only under ``TRITON_INTERPRET=1``)."""
    return list(_dwt_op(x_BCHW, levels))


def haar_idwt_triton(scales: list[torch.Tensor]) -> torch.Tensor:
    """The fused kernel of :func:`haar_idwt` (the result in the approximation's dtype, as the reference's)."""
    return _idwt_op(scales[0], list(scales[1:]))


def _launch(x: torch.Tensor, levels: int):
    """Grid and tile of a fused launch whose level-L approximation is like ``x``'s."""
    import triton

    assert 1 <= levels <= MAX_FUSED_LEVELS, f"the fused kernels do 1 to {MAX_FUSED_LEVELS} levels, not {levels}"
    assert x.is_floating_point(), f"the Haar kernels take floating-point images, not {x.dtype}"
    assert (x.numel() << 2 * levels) < 2**31, "the kernels index with int32: split the batch"

    side = 1 << levels
    block_p = max(1, PATCH_ELEMENTS // (side * side))
    return (triton.cdiv(x.numel(), block_p),), dict(SIDE=side, BLOCK_P=block_p,
                                                     num_warps=8 if side * side * block_p >= 4096 else 4)


def _pointers(details: list[torch.Tensor], filler: torch.Tensor) -> list[torch.Tensor]:
    """``details`` finest first, padded to MAX_FUSED_LEVELS (unused pointers are never touched)."""
    return details + [filler] * (MAX_FUSED_LEVELS - len(details))


@torch.library.triton_op("coarse2fine::haar_dwt", mutates_args=())
def _dwt_op(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The fused DWT as an operator (registered at import like any ``torch.library`` op; its kernels
    are decorated on first run, so ``TRITON_INTERPRET`` is read then)."""
    from torch.library import wrap_triton

    x = x.contiguous()
    B, C, H, W = x.shape
    approx = x.new_empty(B, C, H >> levels, W >> levels)
    details = [x.new_empty(B, 3 * C, H >> lv, W >> lv) for lv in range(1, levels + 1)]  # finest first
    grid, meta = _launch(approx, levels)
    with _on(x.device):
        wrap_triton(_kernels()[0])[grid](x, approx, *_pointers(details, approx), approx.numel(), C,
                                         H >> levels, W >> levels, **meta)
    return [approx] + details[::-1]


@torch.library.triton_op("coarse2fine::haar_idwt", mutates_args=())
def _idwt_op(approx: torch.Tensor, details: list[torch.Tensor]) -> torch.Tensor:
    """The fused inverse as an operator (as :func:`_dwt_op`)."""
    from torch.library import wrap_triton

    approx, levels = approx.contiguous(), len(details)
    finest_first = [d.contiguous() for d in details[::-1]]
    B, C, h, w = approx.shape
    assert all(d.shape == (B, 3 * C, h << (levels - 1 - i), w << (levels - 1 - i)) for i, d in enumerate(finest_first)), (
        f"scales {[tuple(d.shape) for d in details]} do not follow an approximation of {tuple(approx.shape)}")
    out = approx.new_empty(B, C, h << levels, w << levels)
    grid, meta = _launch(approx, levels)
    with _on(approx.device):
        wrap_triton(_kernels()[1])[grid](approx, out, *_pointers(finest_first, approx), approx.numel(), C, h, w, **meta)
    return out


def _dwt_backward(ctx, grads):
    """The adjoint of an orthonormal map is its inverse (autograd gives unused outputs zero gradients)."""
    return _idwt_op(grads[0], list(grads[1:])), None


def _idwt_setup(ctx, inputs, output):
    ctx.levels = len(inputs[1])


def _idwt_backward(ctx, grad):
    scales = _dwt_op(grad, ctx.levels)
    return scales[0], scales[1:]


_dwt_op.register_autograd(_dwt_backward)
_idwt_op.register_autograd(_idwt_backward, setup_context=_idwt_setup)


_patch_offsets = _level_band = None  # the kernels' shared @triton.jit helpers, set by _kernels() (see there)


@functools.cache
def _kernels():
    """(forward, inverse) fused kernels, decorated on first use (``TRITON_INTERPRET`` is read then).

    A program owns ``BLOCK_P`` consecutive level-L pixels (flat index into A (B, C, h, w)) and their
    ``SIDE × SIDE`` input patches (SIDE = 2^L). One level on a (P, s, s) patch stack: view it as
    (P, s/2, 2, s/2, 2), move the two parities last and split them into a, b, c, d (P, s/2, s/2).
    The inverse joins them back. The levels are the powers of two ``half`` in a ``static_range``
    over 1 … SIDE−1 (the others generate no code): a per-level constant must be a loop variable,
    because compiled Triton refuses to reassign an annotated constexpr in an unrolled loop and the
    interpreter turns unannotated integer arithmetic into tensors, which shapes refuse. The shared
    helpers become module globals: both the interpreter and the compiler resolve a kernel's names
    in its module's globals (not in this function's scope), and the compiler accepts a global that
    is a ``@triton.jit`` function (not a namespace holding one).
    """
    global _patch_offsets, _level_band
    import triton
    import triton.language as tl

    @triton.jit
    def patch_offsets(bc, py, px, h, w, SIDE: tl.constexpr):
        """Offsets (P, SIDE, SIDE) of each level-L pixel's input patch in the (B, C, h·SIDE, w·SIDE) image."""
        i = tl.arange(0, SIDE)
        return (bc[:, None, None] * (h * SIDE) * (w * SIDE) + (py[:, None, None] * SIDE + i[None, :, None]) * (w * SIDE)
                + px[:, None, None] * SIDE + i[None, None, :])

    @triton.jit
    def level_band(bc, py, px, C, h, w, d1, d2, d3, d4, d5, d6, half: tl.constexpr, SIDE: tl.constexpr):
        """(pointer, offsets (P, half, half), band stride) of the H band under each patch in the
        level's (B, 3C, h·half, w·half) map; V and D are one and two band strides on."""
        j = tl.arange(0, half)
        start = ((bc // C) * 3 * C + bc % C) * (h * half) * (w * half)  # (P,): channel c of image b's H band
        off = (start[:, None, None] + (py[:, None, None] * half + j[None, :, None]) * (w * half)
               + px[:, None, None] * half + j[None, None, :])
        if 2 * half == SIDE:  # static (half and SIDE are compile-time constants); _launch allows at most
            ptr = d1  # MAX_FUSED_LEVELS = 6 levels, so d6 is the last
        elif 4 * half == SIDE:
            ptr = d2
        elif 8 * half == SIDE:
            ptr = d3
        elif 16 * half == SIDE:
            ptr = d4
        elif 32 * half == SIDE:
            ptr = d5
        else:
            ptr = d6
        return ptr, off, C * (h * half) * (w * half)

    _patch_offsets, _level_band = patch_offsets, level_band

    @triton.jit
    def haar_dwt_kernel(x_ptr, a_ptr, d1, d2, d3, d4, d5, d6, n, C, h, w, SIDE: tl.constexpr, BLOCK_P: tl.constexpr):
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (P,) level-L pixels
        m, mm = p < n, (p < n)[:, None, None]
        bc, rem = p // (h * w), p % (h * w)
        py, px = rem // w, rem % w
        off = _patch_offsets(bc, py, px, h, w, SIDE)  # (P, SIDE, SIDE)
        x = tl.load(x_ptr + off, mask=mm).to(tl.float32)  # fp32 arithmetic whatever the storage (stores cast back)
        for half in tl.static_range(SIDE - 1, 0, -1):  # the levels: half = SIDE/2, SIDE/4, …, 1 (module docstring)
            if (half & (half - 1)) == 0:
                x = tl.permute(tl.reshape(x, (BLOCK_P, half, 2, half, 2)), (0, 1, 3, 2, 4))  # (P, half, half, row, col)
                left, right = tl.split(x)  # by column parity: each (P, half, half, row)
                a, c = tl.split(left)
                b, d = tl.split(right)
                dst, doff, band = _level_band(bc, py, px, C, h, w, d1, d2, d3, d4, d5, d6, half, SIDE)
                tl.store(dst + doff, (a + b - c - d) * 0.5, mask=mm)
                tl.store(dst + doff + band, (a - b + c - d) * 0.5, mask=mm)
                tl.store(dst + doff + 2 * band, (a - b - c + d) * 0.5, mask=mm)
                x = (a + b + c + d) * 0.5  # (P, half, half): the next level's input
        tl.store(a_ptr + p, tl.reshape(x, (BLOCK_P,)), mask=m)

    @triton.jit
    def haar_idwt_kernel(a_ptr, out_ptr, d1, d2, d3, d4, d5, d6, n, C, h, w, SIDE: tl.constexpr, BLOCK_P: tl.constexpr):
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        m, mm = p < n, (p < n)[:, None, None]
        bc, rem = p // (h * w), p % (h * w)
        py, px = rem // w, rem % w
        x = tl.reshape(tl.load(a_ptr + p, mask=m).to(tl.float32), (BLOCK_P, 1, 1))
        for half in tl.static_range(1, SIDE):  # half = 1, 2, …, SIDE/2: coarsest level first
            if (half & (half - 1)) == 0:
                src, doff, band = _level_band(bc, py, px, C, h, w, d1, d2, d3, d4, d5, d6, half, SIDE)
                H = tl.load(src + doff, mask=mm).to(tl.float32)
                V = tl.load(src + doff + band, mask=mm).to(tl.float32)
                D = tl.load(src + doff + 2 * band, mask=mm).to(tl.float32)
                top = tl.join((x + H + V + D) * 0.5, (x + H - V - D) * 0.5)  # (P, half, half, col 2)
                bottom = tl.join((x - H + V - D) * 0.5, (x - H - V + D) * 0.5)
                x = tl.reshape(tl.permute(tl.join(top, bottom), (0, 1, 4, 2, 3)), (BLOCK_P, 2 * half, 2 * half))
        off = _patch_offsets(bc, py, px, h, w, SIDE)
        tl.store(out_ptr + off, x, mask=mm)

    return haar_dwt_kernel, haar_idwt_kernel
