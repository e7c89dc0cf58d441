"""AR-SIT sampling throughput per stop scale: without the KV cache, with it, and on CUDA with its
one-token step replayed from a CUDA graph, plain or compiled first (SIT Table 2 shape).

    python benchmarks/bench_arsit.py [--device cpu|cuda] [--gen-size mini] [--tok-size mini]
                                     [--resolution 128] [--scales 4] [--tokens 64] [--batch 8] [--cfg 2.0]

For each stop scale s: images/s of sampling the first s·N tokens (classifier-free guidance on, as
the CLI default) plus decoding them with the scale-causal SIT decoder: recomputing the whole prefix
at every token (the reference), with the static KV cache (eager), and on CUDA with the cached step
captured in a CUDA graph (the default there) and compiled then captured (``compile_step``); same
process, same seed. The CUDA graph must give the eager cached step's tokens bitwise; the reference
and the compiled step are reported as the share of tokens equal to the cached run's (their kernels
round differently, and one flipped draw changes every later token of that image). Each call's graph capture and
compilation (after the first) count in its time. Weights are random: throughput does not depend
on them. Prints a markdown table; the last column is the speed-up of stopping early relative to
the full sequence, default mode (the seed: 2.5 → 54.5 images/s from 256 to 32 px).
"""

from __future__ import annotations

import argparse
import time

import torch

from cpu_load import wait_idle

from coarse2fine.train.generate import decode
from coarse2fine.train.models.arsit import ARSITConfig, build_generator
from coarse2fine.train.models.sit import SITConfig, build_tokenizer
from coarse2fine.train.sampling import sample_tokens


def images_per_s(gen, tok, cond, s: int, mode: dict, guidance: float, iters: int, device) -> tuple[float, torch.Tensor]:
    def once() -> torch.Tensor:
        ids = sample_tokens(gen, cond, s * gen.cfg.tokens_per_scale, guidance=guidance,
                            generator=torch.Generator(device).manual_seed(0), **mode)
        with torch.no_grad():
            decode(tok, ids)
        return ids

    once()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    else:
        wait_idle()  # a shared CPU distorts the ratio (cpu_load.py)
    t = time.perf_counter()
    for _ in range(iters):
        ids = once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * len(cond) / (time.perf_counter() - t), ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gen-size", default="mini")
    p.add_argument("--tok-size", default="mini")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--scales", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    tok = build_tokenizer(SITConfig(resolution=a.resolution, num_scales=a.scales, tokens_per_scale=a.tokens,
                                    size=a.tok_size, codebook_size=a.codebook, causal_encoder=False)).to(device).eval()
    gen = build_generator(ARSITConfig(a.scales, a.tokens, a.codebook, num_classes=10, size=a.gen_size)).to(device).eval()
    cond = torch.arange(a.batch, device=device) % 10
    print(f"device {device}, generator {a.gen_size}, tokenizer {a.tok_size} SIT-SCD {a.scales}x{a.tokens} tokens, "
          f"{a.resolution}px, batch {a.batch}, CFG {a.cfg}\n")
    modes = {"uncached": dict(use_cache=False), "cached": dict(cuda_graph=False)}
    if device.type == "cuda":
        modes |= {"cached + CUDA graph": dict(cuda_graph=True),
                  "cached + compile + CUDA graph": dict(cuda_graph=True, compile_step=True)}
    default = "cached + CUDA graph" if device.type == "cuda" else "cached"
    print("| stop scale | resolution | tokens | " + " | ".join(f"images/s {m}" for m in modes)
          + f" | {default} / uncached | tokens equal to cached: uncached / compiled | vs full sequence |")
    print("|---" * (len(modes) + 6) + "|")
    rows = []
    for s in range(1, a.scales + 1):
        speed, ids = {}, {}
        for name, mode in modes.items():
            speed[name], ids[name] = images_per_s(gen, tok, cond, s, mode, a.cfg, a.iters, device)
        if "cached + CUDA graph" in ids:  # the same kernels replayed: bitwise the same tokens
            assert torch.equal(ids["cached + CUDA graph"], ids["cached"]), "the CUDA graph changed the tokens"
        agree = {m: f"{(ids[m] == ids['cached']).float().mean().item():.1%}" for m in ("uncached", "cached + compile + CUDA graph")
                 if m in ids}
        rows.append((s, a.resolution >> (a.scales - s), s * a.tokens, speed, agree))
    full = rows[-1][3][default]
    for s, res, n, speed, agree in rows:
        print(f"| {s} | {res} | {n} | " + " | ".join(f"{v:.1f}" for v in speed.values())
              + f" | {speed[default] / speed['uncached']:.2f}x | {' / '.join(agree.values())} | {speed[default] / full:.1f}x |")

if __name__ == "__main__":
    main()
