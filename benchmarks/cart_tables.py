"""CART seed Fig. 7 and Table 4 in miniature, on the demo data through the real pipeline
(Beam → Ray Train → MLflow), every tokenizer with the same data, steps, optimiser, codebook and
number of token maps M.

    python benchmarks/cart_tables.py [--steps 800] [--gen-steps 600] [--gen-size mini]

Fig. 7: reconstruction MSE (images in [0, 1]) on the held-out split after decoding the first m
maps, m = 1 … M, for three tokenizers with M = 10 maps and one codebook: the "vanilla" residual
VQ-VAE (ten 8×8 maps of the image), the multi-scale one (order 0: VAR's scales 1…8 then three
more 8×8 maps of the image) and the base-detail one (order 3: the same seven base maps of B_3,
then one 8×8 map per detail D_3, D_2, D_1). Table 4: CART's generator on the order-0 and order-3
tokens (same transformer, steps, CFG), FID/KID against the real images (n stated) and images/s.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time

import torch

from coarse2fine.evaluate.tokenizer_eval import held_out
from common import demo_config
from coarse2fine.pipelines import runs, stages
from coarse2fine.train.checkpoints import load_model
from coarse2fine.train.data import load_bases

VARIANTS = {  # M = 10 maps each, 347 or 640 tokens
    "vanilla residual (10 × 8²)": ["tokenizer.cart.order=0", "tokenizer.cart.base_scales=[8,8,8,8,8,8,8,8,8,8]"],
    "multi-scale, order 0 (1…8, 3 × 8²)": ["tokenizer.cart.order=0",
                                          "tokenizer.cart.base_scales=[1,2,3,4,5,6,8,8,8,8]"],
    "base-detail, order 3 (1…8, D3 D2 D1)": ["tokenizer.cart.order=3", "tokenizer.cart.base_scales=[1,2,3,4,5,6,8]"],
}


@torch.no_grad()
def mse_per_prefix(cfg, run_id: str) -> tuple[list[float], int]:
    """Held-out reconstruction MSE after decoding the first m maps, m = 1 … M, and n."""
    tags = runs.finished_run(cfg.tracking, run_id)
    method, model = load_model(tags[runs.CHECKPOINT_TAG], "cpu", "tokenizer")
    x, _, keys = held_out(tags["c2f.images"], cfg.evaluate.max_samples)
    k = method.factors(model.cfg)
    bases = load_bases(tags["c2f.decomposition"], keys, k) if k else None
    _, ids_BL, _ = model(x, bases)
    out, t = [], 0
    for s in model.cfg.map_sizes:
        t += s
        out.append(float(((model.decode_indices(ids_BL[:, :t]).clamp(0, 1) - x) ** 2).mean()))
    return out, len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="tokenizer training steps (every variant)")
    ap.add_argument("--gen-steps", type=int, default=600, help="generator training steps (both orders)")
    ap.add_argument("--gen-size", default="mini", help="generator size (train/models/arsit.py GENERATOR_SIZES)")
    ap.add_argument("--experiment", default="cart-tables")
    args = ap.parse_args()
    base = [f"tracking.experiment={args.experiment}", f"tokenizer.train.max_steps={args.steps}",
            "tokenizer.method=cart", "generator.method=cart", f"generator.cart.size={args.gen_size}",
            f"generator.train.max_steps={args.gen_steps}"]
    cfg = demo_config(base)
    curves, gens = {}, []
    for name, overrides in VARIANTS.items():
        cfg = demo_config(base + overrides)
        t = time.perf_counter()
        ref = stages.train_tokenizer(cfg)
        seconds = time.perf_counter() - t
        top = stages.evaluate_tokenizer(cfg, ref.run_id)[0]
        curves[name] = (*mse_per_prefix(cfg, ref.run_id), top, seconds, ref.run_id)
        if "vanilla" not in name:
            tokens = stages.tokenize(cfg, ref.run_id).uris["tokens"]
            t = time.perf_counter()
            gen = stages.train_generator(cfg, tokenizer_run=ref.run_id, tokens_uri=tokens)
            gen_seconds = time.perf_counter() - t
            row = stages.evaluate_generator(cfg, gen.run_id)["maps"][0]
            gens.append((name, row, gen_seconds, gen.run_id))
    print(f"\n### CART Fig. 7 in miniature: held-out MSE after decoding m maps ({args.steps} tokenizer steps)\n")
    print("| tokenizer | " + " | ".join(f"m={m}" for m in range(1, 11)) + " | PSNR | rFID (n) | train s | run |")
    print("|---|" + "---|" * 10 + "---|---|---|---|")
    for name, (mse, n, top, seconds, run) in curves.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in mse) +
              f" | {top['psnr']:.2f} | {top.get('rfid', float('nan')):.1f} ({n}) | {seconds:.0f} | {run[:8]} |")
    print(f"\n### CART Table 4 in miniature (generator {args.gen_size}, {args.gen_steps} steps, CFG "
          f"{cfg.generator.guidance})\n")
    print("| decomposition order | tokens | FID | KID | n (fake / real) | images/s | forward passes | train s | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, seconds, run in gens:
        print(f"| {name} | {r['tokens']} | {r['fid']:.1f} | {r['kid']:.4f} | {r['n']} / {r['n_real']} | "
              f"{r['images_per_s']:.1f} | {r['forward_passes']} | {seconds:.0f} | {run[:8]} |")


if __name__ == "__main__":
    main()
