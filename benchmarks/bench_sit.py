"""Encode+decode throughput of SIT-SC vs the ViT-VQGAN baseline per input resolution (SIT Table 1 shape).

    python benchmarks/bench_sit.py [--device cpu|cuda] [--size small] [--resolution 256]
                                   [--scales 5] [--tokens 256] [--batch 8] [--iters 5]

SIT-SC encodes/decodes a 256/2^k input natively with its first S-k scales (k·N fewer tokens);
the baseline (same transformer, pixel patches, ``--baseline-tokens`` tokens) gets the
input upsampled to full resolution, as in the seed (§5.1). Weights are random: throughput does not
depend on them. Prints a markdown table with images/s and the SIT-SC / baseline ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from coarse2fine.train.models.sit import SITConfig, build_tokenizer


def timed(fn, x: torch.Tensor, iters: int, device: torch.device) -> float:
    with torch.no_grad():
        fn(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="small")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--scales", type=int, default=5)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--baseline-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    common = dict(resolution=args.resolution, size=args.size, codebook_size=8192)
    sit = build_tokenizer(SITConfig(num_scales=args.scales, tokens_per_scale=args.tokens, **common)).to(device).eval()
    base = build_tokenizer(SITConfig(num_scales=1, tokens_per_scale=args.baseline_tokens, per_scale_codebooks=False,
                                     enc_per_scale_params=False, dec_per_scale_params=False, causal_encoder=False, causal_decoder=False,
                                     **common)).to(device).eval()
    n_params = {m: sum(p.numel() for p in model.parameters()) / 1e6 for m, model in (("sit", sit), ("base", base))}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; size {args.size}: SIT-SC {n_params['sit']:.1f}M params "
          f"({args.scales} scales × {args.tokens} tokens), ViT-VQGAN {n_params['base']:.1f}M params "
          f"({args.baseline_tokens} tokens); batch {args.batch}\n")
    print("| input | SIT-SC tokens | SIT-SC img/s | ViT-VQGAN img/s (upsampled input) | ratio |\n|---|---|---|---|---|")
    R = args.resolution

    def baseline(x):
        up = F.interpolate(x, size=(R, R), mode="bilinear", align_corners=False) if x.shape[-1] != R else x
        return F.avg_pool2d(base(up)[0], R // x.shape[-1])

    for k in range(args.scales):
        r = R >> k
        x = torch.rand(args.batch, 3, r, r, device=device)
        s_ips = timed(lambda t: sit(t)[0], x, args.iters, device)
        b_ips = timed(baseline, x, args.iters, device)
        print(f"| {r}×{r} | {(args.scales - k) * args.tokens} | {s_ips:.1f} | {b_ips:.1f} | {s_ips / b_ips:.2f} |")


if __name__ == "__main__":
    main()
