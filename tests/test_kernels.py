"""Triton kernels against their torch references and an independent brute force, run on CPU in
Triton's interpreter (TRITON_INTERPRET=1), and the automatic choice between kernel and reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coarse2fine.train import kernels
from coarse2fine.train.kernels import nearest_code as nc

triton = pytest.importorskip("triton", reason="the kernels' CPU tests need triton (the `test` extra installs it)")


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else Triton's CPU interpreter (conftest
    sets TRITON_INTERPRET=1 without CUDA)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def brute_force(z, codes, metric):
    """One code at a time in float64: the index of the smallest distance (the first on ties)."""
    out = []
    for row in z.double():
        best, best_k = float("inf"), -1
        for k, c in enumerate(codes.double()):
            d = float(((row - c) ** 2).sum()) if metric == "euclidean" else float(-(row @ c))
            if d < best:
                best, best_k = d, k
        out.append(best_k)
    return torch.tensor(out)


# shapes off the tile sizes (32 rows, 64 codes, 32 dims) on every axis; D = 64 is CQ's H1·W1 at 64 px
SHAPES = [(37, 100, 8), (64, 512, 32), (5, 70, 64), (33, 1000, 3)]


@pytest.mark.parametrize("metric", nc.METRICS)
@pytest.mark.parametrize("N,K,D", SHAPES)
def test_kernel_finds_the_brute_force_nearest_code(device, metric, N, K, D):
    g = torch.Generator().manual_seed(N * K + D)
    z, codes = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    if metric == "cosine":  # SIT: both sides l2-normalised
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    got = nc.nearest_code_triton(z.to(device), codes.to(device), metric).cpu()
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert torch.equal(got, brute_force(z, codes, metric))
    assert torch.equal(nc.nearest_code_reference(z, codes, metric), got)


def test_ties_go_to_the_lowest_index_in_kernel_and_reference(device):
    """Codes 70 and 200 repeat code 3 (in its K tile and in another): both pick 3, as torch's argmin
    does. Small integer vectors make the tie exact whatever the summation order (a BLAS, the
    interpreter's ``tl.dot``, sums columns of one tile in different orders: with real-valued codes
    two equal columns can differ in the last bit)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-3, 4, (260, 16), generator=g).float()
    codes[70] = codes[200] = codes[3]
    z = codes[[3, 3, 5]]
    for metric in ("euclidean",):
        assert nc.nearest_code_triton(z.to(device), codes.to(device), metric).tolist()[:2] == [3, 3]
        assert nc.nearest_code_reference(z, codes, metric).tolist()[:2] == [3, 3]


def test_the_first_and_last_codes_are_found(device):
    """Rows next to code 0 and to code K − 1 (tile edges) find them."""
    g = torch.Generator().manual_seed(2)
    codes = F.normalize(torch.randn(130, 16, generator=g), dim=-1)  # unit codes: nearest by both metrics
    z = codes[[0, 129, 64, 0]] + 1e-3 * torch.randn(4, 16, generator=g)
    for metric in nc.METRICS:
        assert nc.nearest_code_triton(z.to(device), codes.to(device), metric).tolist() == [0, 129, 64, 0]


@pytest.mark.parametrize("z,codes", [(torch.randn(8), torch.randn(4, 8)), (torch.randn(2, 8), torch.randn(4, 7)),
                                     (torch.randn(2, 8), torch.randn(4, 2, 8))])
def test_wrong_shapes_are_refused(z, codes):
    with pytest.raises(AssertionError):
        nc.nearest_code(z, codes, "euclidean")


def test_an_empty_codebook_is_refused(device):
    with pytest.raises(AssertionError, match="empty codebook"):
        nc.nearest_code_triton(torch.randn(2, 8, device=device), torch.randn(0, 8, device=device), "euclidean")


def test_cpu_tensors_and_the_switch_take_the_reference(monkeypatch):
    """The kernel runs only on CUDA tensors; `train.kernels: reference` forces torch everywhere."""
    calls = []
    monkeypatch.setattr(nc, "nearest_code_triton", lambda *a, **k: calls.append(a))
    z, codes = torch.randn(4, 8), torch.randn(10, 8)
    assert torch.equal(nc.nearest_code(z, codes, "euclidean"), brute_force(z, codes, "euclidean"))
    assert not calls
    kernels.force_reference(True)
    try:
        assert kernels._FORCE_REFERENCE[0]
    finally:
        kernels.force_reference(False)


def test_long_codes_take_the_kernel_only_when_the_scores_would_not_fit(monkeypatch):
    """The measured rule: short codes (D <= 64) always take the kernel; longer ones only when the
    reference's (N, K) fp32 scores would exceed the memory budget."""
    used = []
    monkeypatch.setattr(nc, "use_kernel", lambda *t: True)
    monkeypatch.setattr(nc, "nearest_code_triton", lambda z, c, m: used.append(z.shape[1]) or nc.nearest_code_reference(z, c, m))
    for D in (64, 65):
        nc.nearest_code(torch.randn(4, D), torch.randn(10, D), "euclidean")
    assert used == [64]
    monkeypatch.setattr(nc, "MAX_SCORES_BYTES", 4 * 4 * 10 - 1)
    nc.nearest_code(torch.randn(4, 65), torch.randn(10, 65), "euclidean")
    assert used == [64, 65]


@pytest.mark.gpu
def test_on_cuda_the_kernel_is_chosen_and_equals_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(1)
    z, codes = torch.randn(4096, 64, generator=g).cuda(), torch.randn(16384, 64, generator=g).cuda()
    used = []
    kernel = nc.nearest_code_triton
    monkeypatch.setattr(nc, "nearest_code_triton", lambda *a, **k: used.append(1) or kernel(*a, **k))
    got = nc.nearest_code(z, codes, "euclidean")
    assert used and torch.equal(got, nc.nearest_code_reference(z, codes, "euclidean"))
    kernels.force_reference(True)
    try:
        used.clear()
        nc.nearest_code(z, codes, "euclidean")
        assert not used
    finally:
        kernels.force_reference(False)


@pytest.mark.gpu
def test_on_cuda_the_fused_haar_kernels_are_chosen_equal_the_reference_and_compile_without_breaks(monkeypatch):
    from coarse2fine.train.kernels import haar

    x = torch.randn(8, 3, 256, 256, device="cuda", requires_grad=True)
    used = []
    kernel = haar.haar_dwt_triton
    monkeypatch.setattr(haar, "haar_dwt_triton", lambda t, n: used.append(1) or kernel(t, n))
    ours, ref = haar.haar_dwt(x, 4), haar.haar_dwt_reference(x, 4)
    assert used and all(torch.allclose(o, r, atol=1e-5) for o, r in zip(ours, ref))
    weights = [torch.randn_like(r) for r in ref]
    sum((o * w).sum() for o, w in zip(ours, weights)).backward()
    grad_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), x)[0]
    assert torch.allclose(x.grad, grad_ref, atol=1e-5)
    # a triton_op: torch.compile traces into both kernels (fullgraph fails on a graph break), and
    # inductor's code launches them (not a decomposition into the torch reference)
    from torch._inductor.utils import run_and_get_code

    roundtrip = torch.compile(lambda t: haar.haar_idwt(haar.haar_dwt(t * 2, 3)) + 1, fullgraph=True)
    out, code = run_and_get_code(roundtrip, x.detach())
    assert torch.allclose(out, x.detach() * 2 + 1, atol=1e-5)
    assert "haar_dwt_kernel" in "".join(code) and "haar_idwt_kernel" in "".join(code)
    # half-precision storage (the decoder's scales under bf16 autocast): fp32 arithmetic inside, the reference's dtype out
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.detach().to(dtype)
        for o, r in zip(haar.haar_dwt(xh, 4), haar.haar_dwt_reference(xh.float(), 4)):
            assert o.dtype == dtype and torch.allclose(o.float(), r, atol=0.05, rtol=0.01)
        scales = [t.to(dtype) for t in ref]
        assert haar.haar_idwt(scales).dtype == dtype
        assert torch.allclose(haar.haar_idwt(scales).float(), haar.haar_idwt_reference([t.float() for t in scales]),
                              atol=0.05, rtol=0.01)


@pytest.mark.parametrize("levels, shape", [(1, (2, 3, 8, 8)), (1, (1, 1, 2, 2)), (2, (3, 2, 12, 20)),
                                           (3, (2, 3, 64, 32)), (4, (1, 2, 16, 48)), (5, (1, 2, 32, 64)),
                                           (6, (1, 1, 64, 64))])
def test_fused_haar_kernels_equal_pywavelets_and_train_through_their_adjoints(device, levels, shape):
    """The fused forward kernel against pywt.wavedec2 band by band; the fused inverse undoes it, also
    from fewer scales (a coarser image, against the reference); the gradients of both operators (each
    other's kernels as adjoints) equal the reference's, also when some outputs get no gradient."""
    import numpy as np
    import pywt

    from coarse2fine.train.kernels import haar

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + levels)).to(device)
    ours = haar.haar_dwt_triton(x, levels)
    ref = pywt.wavedec2(x.double().cpu().numpy(), "haar", level=levels, axes=(-2, -1))
    C = shape[1]
    np.testing.assert_allclose(ours[0].cpu().numpy(), ref[0], atol=1e-5)
    for scale, bands in zip(ours[1:], ref[1:]):
        for k, band in enumerate(bands):
            np.testing.assert_allclose(scale[:, k * C:(k + 1) * C].cpu().numpy(), band, atol=1e-5)
    assert torch.allclose(haar.haar_idwt_triton(ours), x, atol=1e-5)
    assert torch.allclose(haar.haar_idwt_triton(ours[:2]), haar.haar_idwt_reference(ours[:2]), atol=1e-5)

    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = [torch.randn_like(o) for o in ours]
    used = slice(0, None) if levels == 1 else slice(1, None)  # with levels > 1 the approximation gets no gradient
    sum((o * w).sum() for o, w in zip(haar.haar_dwt_triton(xk, levels)[used], weights[used])).backward()
    sum((o * w).sum() for o, w in zip(haar.haar_dwt_reference(xr, levels)[used], weights[used])).backward()
    assert torch.allclose(xk.grad, xr.grad, atol=1e-5)
    sk = [o.clone().requires_grad_() for o in ours]
    sr = [o.clone().requires_grad_() for o in ours]
    w = torch.randn_like(x)
    (haar.haar_idwt_triton(sk) * w).sum().backward()
    (haar.haar_idwt_reference(sr) * w).sum().backward()
    assert all(torch.allclose(a.grad, b.grad, atol=1e-5) for a, b in zip(sk, sr))


def test_haar_takes_the_reference_on_cpu_and_beyond_the_fused_levels(monkeypatch):
    from coarse2fine.train.kernels import haar

    monkeypatch.setattr(haar, "haar_dwt_triton", lambda *a: pytest.fail("kernel on a CPU tensor"))
    monkeypatch.setattr(haar, "haar_idwt_triton", lambda *a: pytest.fail("kernel on a CPU tensor"))
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(haar.haar_dwt(x, 2)[0], haar.haar_dwt_reference(x, 2)[0])
    assert torch.equal(haar.haar_idwt(haar.haar_dwt(x, 2)), haar.haar_idwt_reference(haar.haar_dwt(x, 2)))
    monkeypatch.setattr(kernels, "use_kernel", lambda *t: True)  # as on CUDA: too many levels still take the reference
    monkeypatch.setattr(haar, "use_kernel", lambda *t: True)
    deep = torch.randn(1, 1, 2 ** (haar.MAX_FUSED_LEVELS + 1), 2 ** (haar.MAX_FUSED_LEVELS + 1))
    scales = haar.haar_dwt(deep, haar.MAX_FUSED_LEVELS + 1)
    assert len(scales) == haar.MAX_FUSED_LEVELS + 2
    assert torch.allclose(haar.haar_idwt(scales), deep, atol=1e-5)
    ints = torch.randint(0, 255, (1, 3, 4, 4))  # integer images are not the kernels' (they would truncate)
    assert torch.equal(haar.haar_dwt(ints, 1)[0], haar.haar_dwt_reference(ints, 1)[0])


@pytest.mark.parametrize("kernel", ["haar", "nearest_code"])
def test_kernels_pass_tritons_gpu_compiler_without_a_gpu(kernel):
    """The interpreter runs kernel code as Python and accepts what the compiler refuses: the fused Haar
    kernels once reassigned a constexpr in an unrolled loop and failed only on a GPU. Here the
    compiler's front end turns every kernel into TTIR for an sm_90 target, on CPU, in a fresh process
    (the interpreter patches ``triton.language`` in this one)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_front_end.py")), kernel],
                         env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "TTIR ok" in run.stdout


def brute_force_attention(q, k, v, sizes):
    """Softmax attention written out in float64, one query at a time, over the keys whose block
    (counted from ``sizes``) is not after the query's."""
    owner = [b for b, n in enumerate(sizes) for _ in range(n)]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[-2]):
        seen = [j for j in range(k.shape[-2]) if owner[j] <= owner[i]]
        scores = q[..., i, None, :].double() @ k[..., seen, :].double().transpose(-1, -2) / q.shape[-1] ** 0.5
        out[..., i, :] = (scores.softmax(-1) @ v[..., seen, :].double())[..., 0, :]
    return out


@pytest.mark.parametrize("sizes", [(1, 4, 16, 9), (16, 64, 100, 200)])  # the second spans three 128-token tiles
def test_block_causal_attention_and_its_flex_block_mask_equal_brute_force(sizes):
    """The reference (SDPA + cached mask) and FlexAttention given our ``BlockMask`` against brute
    force. Uncompiled (all FlexAttention runs on CPU) it applies our ``mask_mod`` densely; the tile
    structure that the compiled kernel skips by is built by torch from the same ``mask_mod``, and
    the compiled CUDA kernel itself is the GPU test below."""
    from torch.nn.attention.flex_attention import flex_attention

    from coarse2fine.train.kernels import attention

    g = torch.Generator().manual_seed(len(sizes))
    q, k, v = (torch.randn(2, 3, sum(sizes), 16, generator=g) for _ in range(3))
    expected = brute_force_attention(q, k, v, sizes)
    assert torch.allclose(attention.block_causal_attention(q, k, v, sizes).double(), expected, atol=1e-5)
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=attention.flex_block_mask(sizes, q.device))
    assert torch.allclose(flex.double(), expected, atol=1e-5)


def test_block_causal_attention_takes_the_reference_on_cpu(monkeypatch):
    from coarse2fine.train.kernels import attention

    monkeypatch.setattr(attention, "_compiled_flex", lambda: pytest.fail("FlexAttention on a CPU tensor"))
    q = torch.randn(1, 2, attention.FLEX_MIN_TOKENS, 16)
    attention.block_causal_attention(q, q, q, (2, attention.FLEX_MIN_TOKENS - 2))


@pytest.mark.parametrize("L, hs, flex", [(64, 16, True), (65, 32, True), (63, 16, False), (64, 24, False),
                                         (64, 20, False), (64, 8, False)])
def test_flex_attention_serves_long_sequences_with_power_of_two_heads(monkeypatch, L, hs, flex):
    """The measured rule (where the kernel may run): FlexAttention from FLEX_MIN_TOKENS tokens on,
    for head sizes tl.dot tiles; the reference otherwise. Both give the brute-force result."""
    from torch.nn.attention.flex_attention import flex_attention

    from coarse2fine.train.kernels import attention

    used = []
    monkeypatch.setattr(attention, "use_kernel", lambda *t: True)
    monkeypatch.setattr(attention, "FLEX_MIN_TOKENS", 64)
    monkeypatch.setattr(attention, "_compiled_flex", lambda: used.append(1) or flex_attention)
    sizes = (L // 3, L - L // 3)
    q, k, v = (torch.randn(1, 2, L, hs) for _ in range(3))
    with torch.no_grad():
        out = attention.block_causal_attention(q, k, v, sizes)
    assert bool(used) == flex
    assert torch.allclose(out.double(), brute_force_attention(q, k, v, sizes), atol=1e-5)


def test_block_causal_attention_refuses_blocks_that_do_not_cover_the_sequence():
    from coarse2fine.train.kernels import attention

    q = torch.randn(1, 2, 5, 16)
    for sizes in ((2, 4), (2, 2)):
        with pytest.raises(AssertionError, match="tokens for blocks of"):
            attention.block_causal_attention(q, q, q, sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes, hs, flex", [((1024,) * 5, 64, True), ((1024,) * 5, 24, False), ((256,) * 5, 64, False)])
def test_on_cuda_flex_attention_is_chosen_by_length_and_head_size_and_equals_the_reference(monkeypatch, sizes, hs, flex):
    """SIT-shaped (5 scales at 512 and 256 px): compiled FlexAttention where the rule picks it,
    forward and gradients equal to SDPA with the dense mask (fp32 inputs)."""
    from coarse2fine.train.kernels import attention

    used = []
    compiled = attention._compiled_flex
    monkeypatch.setattr(attention, "_compiled_flex", lambda: used.append(1) or compiled())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, sum(sizes), hs, generator=g).cuda().requires_grad_() for _ in range(3))
    out = attention.block_causal_attention(q, k, v, sizes)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    mask = attention.block_causal_mask(sizes, q.device)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert bool(used) == flex
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)
