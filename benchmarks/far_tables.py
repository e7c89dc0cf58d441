"""FAR seed Fig. 5 and its FAR-vs-MAR comparison in miniature, on the demo data through the real
pipeline (Beam → Ray Train → MLflow).

    python benchmarks/far_tables.py [--steps 800] [--gen-steps 600] [--gen-size mini]

Fig. 5: reconstruction PSNR/SSIM/rFID on the held-out split of the continuous tokenizer (``kl``:
8×8×16 latents) and of the same conv autoencoder with a VQ bottleneck at the same compression
(``vqgan``: 8×8 tokens of dimension 16, K = 512), same steps and optimiser. FAR vs MAR: both
generators on the same ``kl`` latents (same transformer size, steps, CFG), FID/KID (n stated),
images/s and forward passes per image: FAR over its level schedule (8 steps), MAR at 8 and 64
reveal steps. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time

from common import demo_config
from coarse2fine.pipelines import stages

TOKENIZERS = {
    "continuous (kl, 8×8×16)": ["tokenizer.method=kl"],
    "discrete (VQ, 8×8, dim 16, K=512)": ["tokenizer.method=vqgan", "tokenizer.vqgan.z_channels=16"],
}
LATENTS = "continuous (kl, 8×8×16)"  # the tokenizer whose latents both generators model
GENERATORS = ("far", "mar")  # the seed's comparison: FAR and its baseline MAR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="tokenizer training steps (both tokenizers)")
    ap.add_argument("--gen-steps", type=int, default=600, help="generator training steps (FAR and MAR)")
    ap.add_argument("--gen-size", default="mini", help="generator size (train/models/mar.py MAR_SIZES)")
    ap.add_argument("--experiment", default="far-tables")
    args = ap.parse_args()
    base = [f"tracking.experiment={args.experiment}", f"tokenizer.train.max_steps={args.steps}",
            f"generator.train.max_steps={args.gen_steps}", f"generator.mar.size={args.gen_size}",
            f"generator.far.size={args.gen_size}"]
    recon, kl_run = [], None
    for name, overrides in TOKENIZERS.items():
        cfg = demo_config(base + overrides)
        t = time.perf_counter()
        ref = stages.train_tokenizer(cfg)
        seconds = time.perf_counter() - t
        recon.append((name, stages.evaluate_tokenizer(cfg, ref.run_id)[0], seconds, ref.run_id))
        if name == LATENTS:
            kl_run, kl_cfg = ref.run_id, cfg
    tokens = stages.tokenize(kl_cfg, kl_run).uris["tokens"]
    gens = []
    for method in GENERATORS:
        cfg = demo_config(base + TOKENIZERS[LATENTS] + [f"generator.method={method}"])
        t = time.perf_counter()
        gen = stages.train_generator(cfg, tokenizer_run=kl_run, tokens_uri=tokens)
        seconds = time.perf_counter() - t
        for row in stages.evaluate_generator(cfg, gen.run_id)["steps"]:
            gens.append((method.upper(), row, seconds, gen.run_id))
    print(f"\n### FAR Fig. 5 in miniature: continuous vs discrete tokenizer at f=8 ({args.steps} steps)\n")
    print("| tokenizer | PSNR | SSIM | rFID (n) | train s | run |")
    print("|---|---|---|---|---|---|")
    for name, r, seconds, run in recon:
        print(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r.get('rfid', float('nan')):.1f} ({r['n']}) | "
              f"{seconds:.0f} | {run[:8]} |")
    print(f"\n### FAR vs MAR in miniature (kl latents, generator {args.gen_size}, {args.gen_steps} steps, CFG "
          f"{cfg.generator.guidance})\n")
    print("| generator | steps | FID | KID | n (fake / real) | images/s | transformer passes | diffusion-head passes "
          "| train s | run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r, seconds, run in gens:
        print(f"| {name} | {r['steps']} | {r['fid']:.1f} | {r['kid']:.4f} | {r['n']} / {r['n_real']} | "
              f"{r['images_per_s']:.1f} | {r['forward_passes']} | {r['diffusion_passes']} | {seconds:.0f} | {run[:8]} |")


if __name__ == "__main__":
    main()
