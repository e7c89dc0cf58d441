"""Triton kernels vs their baselines: fused nearest-code search (``train/kernels/nearest_code.py``)
vs ``torch.cdist`` + ``argmin``, and the fused multi-level Haar DWT and inverse
(``train/kernels/haar.py``) vs the torch reference (level by level) and ``pywt.wavedec2`` / ``waverec2``.

    python benchmarks/bench_kernels.py [--repeats 5]

For each (N vectors, K codes, D dims) — SIT's factorised codes (D 8–32, cosine), CQ's long channel
vectors (D = H1·W1 = 256 at 256 px) and spatial VQ (D 8–64), K up to 65,536 — the median seconds
and peak device memory of: the baseline ``torch.cdist(z, codes).argmin(-1)``, our torch reference
(one fp32 matmul, argmin) and, on CUDA, the Triton kernel; ratios baseline / ours in the same
process. The Haar rows give the kernel's achieved GB/s (the least traffic: input read once, output
written once, per second) beside a same-size ``clone``'s, the device's achievable bandwidth. On CPU only the baselines and the references run (the kernels'
interpreter is for correctness, not speed): the GPU rows are pending until a GPU is lent.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import pywt
import torch

from coarse2fine.train.kernels import haar, triton_available
from coarse2fine.train.kernels.nearest_code import nearest_code_reference, nearest_code_triton

CASES = [  # (name, N, K, D, metric)
    ("SIT scale tokens", 8192, 4096, 16, "cosine"),
    ("spatial VQ 16x16", 16384, 16384, 8, "euclidean"),
    ("CQ channel tokens (256 px)", 4096, 65536, 256, "euclidean"),
    ("large K, short codes", 16384, 65536, 32, "euclidean"),
]


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak MiB on CUDA or nan) of ``fn()``."""
    fn()  # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply N and K (e.g. 0.1 on a CPU)")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's tile sizes and warps (GPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda" and triton_available()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}; median of {args.repeats}; memory = peak allocated (CUDA)\n")
    print("| case | N | K | D | cdist+argmin s | reference s | kernel s | cdist / kernel | peak MiB cdist / reference / kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, N, K, D, metric in CASES:
        N, K = max(1, int(N * args.scale)), max(1, int(K * args.scale))
        g = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(N, D, device=device, generator=g)
        codes = torch.randn(K, D, device=device, generator=g)
        base_t, base_m = timed(lambda: torch.cdist(z, codes).argmin(-1), args.repeats, device)
        ref_t, ref_m = timed(lambda: nearest_code_reference(z, codes, metric), args.repeats, device)
        if gpu:
            ker_t, ker_m = timed(lambda: nearest_code_triton(z, codes, metric), args.repeats, device)
            assert torch.equal(nearest_code_triton(z, codes, metric), nearest_code_reference(z, codes, metric))
            tail = f"{ker_t:.4f} | {base_t / ker_t:.2f} | {base_m:.0f} / {ref_m:.0f} / {ker_m:.0f}"
        else:
            tail = "pending (no GPU) | – | –"
        print(f"| {case} | {N} | {K} | {D} | {base_t:.4f} | {ref_t:.4f} | {tail} |", flush=True)
    if gpu and args.sweep:
        sweep(args.repeats, device)
    print("\n| Haar, input | levels | direction | pywt s (CPU, float64) | torch reference s | fused kernel s "
          "| reference / kernel | kernel GB/s | copy GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, side in ((64, 256), (16, 1024)):
        B = max(1, int(B * args.scale))
        x = torch.randn(B, 3, side, side, device=device)
        moved = 2 * x.numel() * x.element_size()  # the least traffic: read the input once, write as many values
        copy_t = timed(lambda: x.clone(), args.repeats, device)[0]  # the device's achievable bandwidth
        for levels in (1, 4):
            scales = haar.haar_dwt_reference(x, levels)
            x64 = x.cpu().double().numpy()
            pywt_fwd = timed(lambda: pywt.wavedec2(x64, "haar", level=levels, axes=(-2, -1)), 1, torch.device("cpu"))[0]
            coeffs = pywt.wavedec2(x64, "haar", level=levels, axes=(-2, -1))
            pywt_inv = timed(lambda: pywt.waverec2(coeffs, "haar", axes=(-2, -1)), 1, torch.device("cpu"))[0]
            runs = (("DWT", pywt_fwd, lambda: haar.haar_dwt_reference(x, levels), lambda: haar.haar_dwt_triton(x, levels)),
                    ("IDWT", pywt_inv, lambda: haar.haar_idwt_reference(scales), lambda: haar.haar_idwt_triton(scales)))
            for direction, pywt_t, reference, kernel in runs:
                ref_t = timed(reference, args.repeats, device)[0]
                if gpu:
                    ker_t = timed(kernel, args.repeats, device)[0]
                    tail = f"{ker_t:.5f} | {ref_t / ker_t:.2f} | {moved / ker_t / 1e9:.0f} | {moved / copy_t / 1e9:.0f}"
                else:
                    tail = f"pending (no GPU) | – | – | {moved / copy_t / 1e9:.1f}"
                print(f"| {B}×3×{side}² | {levels} | {direction} | {pywt_t:.4f} | {ref_t:.5f} | {tail} |", flush=True)

def sweep(repeats: int, device: torch.device) -> None:
    """Seconds of the kernel per (BLOCK_N, BLOCK_K, BLOCK_D, num_warps) on the two largest cases."""
    configs = list(itertools.product((32, 64, 128), (64, 128), (32, 64), (4, 8)))
    print("\n| case | BLOCK_N | BLOCK_K | BLOCK_D | warps | kernel s |\n|---|---|---|---|---|---|")
    for case, N, K, D, metric in CASES[2:]:
        g = torch.Generator(device=device).manual_seed(0)
        z, codes = torch.randn(N, D, device=device, generator=g), torch.randn(K, D, device=device, generator=g)
        for bn, bk, bd, warps in configs:
            t = timed(lambda: nearest_code_triton(z, codes, metric, bn, bk, bd, warps), repeats, device)[0]
            print(f"| {case} | {bn} | {bk} | {bd} | {warps} | {t:.4f} |", flush=True)


if __name__ == "__main__":
    main()
