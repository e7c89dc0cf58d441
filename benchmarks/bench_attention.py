"""Block-causal attention (``train/kernels/attention.py``): FlexAttention with our ``BlockMask`` vs
SDPA with the dense boolean mask (the reference), forward + backward, in one process.

    python benchmarks/bench_attention.py [--repeats 10] [--dtype bf16|fp32]

Shapes (batch, heads, head size from ``MODEL_SIZES`` / ``GENERATOR_SIZES``):

* SIT at 256 px: 5 scales × 256 tokens (L = 1280, seed Table 1's SIT-SC), encoder size ``small``;
* SIT at 256 px with 16 tokens per scale at 5 scales (the demo's token layout, L = 80);
* CART at 256 px (f = 16, a 16×16 latent): VAR's ten scales 1…16 then three 16×16 detail maps
  (L = 1448), generator size ``parti-350m``; the detail depth is a config choice, three is for the
  shape only;
* longer sequences, to find where skipping masked tiles pays: SIT at 512 px (5 × 1024 tokens) and a
  synthetic 16 blocks × 512 tokens (L = 8192, 47% of the tiles wholly masked).

Columns: milliseconds of forward + backward (median of ``--repeats`` after a compile warm-up), the
ratio reference / FlexAttention, and SDPA without any mask (full attention, flash kernel) as the
floor a mask-free kernel reaches. bf16 is what training runs under on GPU (``train.bf16``). On CPU
only the reference runs (FlexAttention's backward has no CPU kernel): the GPU columns say pending.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from coarse2fine.train.kernels import attention
from coarse2fine.train.models.arsit import GENERATOR_SIZES
from coarse2fine.train.models.sit import MODEL_SIZES

CASES = [  # (name, block sizes, batch, model size dict)
    ("SIT 5×256 (256 px)", (256,) * 5, 8, MODEL_SIZES["small"]),
    ("SIT 5×16 (demo layout)", (16,) * 5, 64, MODEL_SIZES["small"]),
    ("CART 10 scales + 3 details", tuple(s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 16, 16, 16)), 8,
     GENERATOR_SIZES["parti-350m"]),
    ("8 blocks × 256 (FLEX_MIN_TOKENS gap)", (256,) * 8, 4, MODEL_SIZES["small"]),
    ("12 blocks × 256 (FLEX_MIN_TOKENS gap)", (256,) * 12, 2, MODEL_SIZES["small"]),
    ("16 blocks × 256 (FLEX_MIN_TOKENS gap)", (256,) * 16, 2, MODEL_SIZES["small"]),
    ("SIT 5×1024 (512 px)", (1024,) * 5, 2, MODEL_SIZES["small"]),
    ("16 blocks × 512 (synthetic)", (512,) * 16, 1, MODEL_SIZES["small"]),
]


def fwd_bwd_ms(fn, q, k, v, repeats: int) -> float:
    w = torch.randn_like(q)

    def once():
        torch.autograd.grad((fn(q, k, v) * w).sum(), (q, k, v))

    once()  # warm-up (compiles FlexAttention on first use)
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# {name}, torch {torch.__version__}, {args.dtype}; forward + backward ms, median of {args.repeats}\n")
    print("| case | L | B×heads×hs | SDPA + dense mask | FlexAttention | dense / flex | SDPA, no mask |")
    print("|---|---|---|---|---|---|---|")
    for case, sizes, B, size in CASES:
        L, heads = sum(sizes), size["heads"]
        hs = size["dim"] // heads
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, heads, L, hs, device=device, generator=g, dtype=dtype).requires_grad_()
                   for _ in range(3))
        mask = attention.block_causal_mask(sizes, device)
        dense = fwd_bwd_ms(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, args.repeats)
        free = fwd_bwd_ms(F.scaled_dot_product_attention, q, k, v, args.repeats)
        if device.type == "cuda":
            block_mask = attention.flex_block_mask(sizes, device)
            flex_fn = attention._compiled_flex()
            flex = fwd_bwd_ms(lambda a, b, c: flex_fn(a, b, c, block_mask=block_mask), q, k, v, args.repeats)
            tail = f"{flex:.2f} | {dense / flex:.2f}"
        else:
            tail = "pending (no GPU) | –"
        print(f"| {case} | {L} | {B}×{heads}×{hs} | {dense:.2f} | {tail} | {free:.2f} |", flush=True)


if __name__ == "__main__":
    main()
