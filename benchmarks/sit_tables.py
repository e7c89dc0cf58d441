"""SIT seed Tables 1, 2 and 5 in miniature, on the demo data through the real pipeline (Beam → Ray
Train → MLflow), every variant with the same data, steps, optimiser and full objective (L2 +
perceptual 0.1 + adversarial 0.1 with VQGAN's adaptive weight + quantizer terms, seed B.1).

    python benchmarks/sit_tables.py --table 1 [--steps 1000]
    python benchmarks/sit_tables.py --table 2 [--steps 1000] [--gen-steps 1000]
    python benchmarks/sit_tables.py --table 5 [--steps 1000]

Table 1: ViT-VQGAN (64 pixel-patch tokens) vs SIT with the seed's token ratio (5 scales × 16 = 80,
ratio 1.25 as 1280 vs 1024), SIT-SC at an equal budget (4 × 16 = 64), the dense "SIT" row, and
ViT-VQGAN / SIT-SC retrained with MS-SSIM as the perceptual term (pretrained-free), to show how much
the choice of perceptual network moves rFID (FID uses the network whose stem the default
perceptual loss reads). Table 2: AR-SIT over SIT-SCD (4 × 16, stop scales decoded natively) vs
AR-SIT over ViT-VQGAN (64 tokens, generated at full resolution and block-averaged, the seed's
baseline rows). Table 5: the ablations of ``configs/tables/sit_table5.yaml``. Codebook usage is
reported over the held-out images and over the whole tokens dataset. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow

from common import demo_config
from coarse2fine.pipelines import stages
from coarse2fine.pipelines.config import table_variants

TABLE5 = Path("configs/tables/sit_table5.yaml")
SIT_SCD = ["tokenizer.method=sit", "tokenizer.sit.num_scales=4", "tokenizer.sit.causal_encoder=false",
           "tokenizer.sit.causal_decoder=true", "tokenizer.sit.dec_per_scale_params=false"]  # overlays/sit-scd.yaml
VIT_VQ = ["tokenizer.method=vit_vq", "tokenizer.vit_vq.tokens_per_scale=64"]
TABLE1 = {
    "ViT-VQGAN (64)": VIT_VQ,
    "SIT, dense (5×16 = 80)": ["tokenizer.method=sit", "tokenizer.sit.num_scales=5",
                               "tokenizer.sit.causal_encoder=false", "tokenizer.sit.causal_decoder=false"],
    "SIT-SC (5×16 = 80)": ["tokenizer.method=sit", "tokenizer.sit.num_scales=5"],
    "SIT-SC (4×16 = 64)": ["tokenizer.method=sit", "tokenizer.sit.num_scales=4"],
    "ViT-VQGAN (64), MS-SSIM": VIT_VQ + ["tokenizer.train.perceptual=ms_ssim"],
    "SIT-SC (5×16 = 80), MS-SSIM": ["tokenizer.method=sit", "tokenizer.sit.num_scales=5",
                                    "tokenizer.train.perceptual=ms_ssim"],
}


def tokenizer_rows(base: list[str], variants: dict[str, list[str]]) -> list[dict]:
    """Train, evaluate and tokenize each variant; one dict per variant with its per-resolution rows."""
    out = []
    for name, overrides in variants.items():
        cfg = demo_config(base + overrides)
        t = time.perf_counter()
        ref = stages.train_tokenizer(cfg)
        seconds = time.perf_counter() - t
        rows = stages.evaluate_tokenizer(cfg, ref.run_id)
        stages.tokenize(cfg, ref.run_id)
        run = mlflow.MlflowClient().get_run(ref.run_id)
        m = run.data.metrics
        out.append({"name": name, "rows": rows, "run": ref.run_id, "train_s": seconds, "reused": ref.reused,
                    "usage": m.get("codebook_usage", float("nan")), "dataset_usage": m.get("dataset/codebook_usage", float("nan")),
                    "per_group": {k.rsplit("/", 1)[1]: (m[k], m.get(f"dataset/{k}", float("nan")))
                                  for k in sorted(m) if k.startswith("codebook_usage/")},
                    "perceptual": run.data.tags.get("c2f.perceptual", "?")})
        print(f"[{name}] run {ref.run_id[:8]}: {seconds:.0f} s", flush=True)
    return out


def print_reconstruction(results: list[dict], title: str) -> None:
    print(f"\n### {title}\n")
    print("| input | model | tokens | PSNR | SSIM | L1 | rFID (n) | enc+dec img/s |")
    print("|---|---|---|---|---|---|---|---|")
    resolutions = sorted({r["resolution"] for res in results for r in res["rows"]}, reverse=True)
    for px in resolutions:
        for res in results:
            for r in res["rows"]:
                if r["resolution"] == px:
                    print(f"| {px}×{px} | {res['name']} | {r['tokens']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                          f"{r['l1']:.4f} | {r.get('rfid', float('nan')):.1f} ({r['n']}) | {r['images_per_s']:.0f} |")
    print("\n| model | codebook usage, held-out (per group) | usage over the tokens dataset (per group) | "
          "perceptual | train s | run |")
    print("|---|---|---|---|---|---|")
    for res in results:
        held = " / ".join(f"{a:.1%}" for a, _ in res["per_group"].values())
        whole = " / ".join(f"{b:.1%}" for _, b in res["per_group"].values())
        print(f"| {res['name']} | {res['usage']:.1%} ({held}) | {res['dataset_usage']:.1%} ({whole}) | "
              f"{res['perceptual'].split(';')[0]} | {res['train_s']:.0f}{' (reused)' if res['reused'] else ''} | "
              f"{res['run'][:8]} |")


def table2(base: list[str], gen_steps: int) -> None:
    pairs = {"AR-SIT over SIT-SCD (4×16)": SIT_SCD, "AR-SIT over ViT-VQGAN (64, full res. downsampled)": VIT_VQ}
    print(f"\n### SIT Table 2 in miniature (AR-SIT, {gen_steps} steps)\n")
    print("| generator | resolution | tokens sampled | FID (n fake / n real) | KID | images/s |")
    print("|---|---|---|---|---|---|")
    for name, overrides in pairs.items():
        cfg = demo_config(base + overrides + ["generator.method=ar_sit", f"generator.train.max_steps={gen_steps}"])
        gen = stages.train_generator(cfg)
        report = stages.evaluate_generator(cfg, gen.run_id)
        rows = report.get("stop_scales") or report["downsampled"]
        for r in rows:
            print(f"| {name} | {r['resolution']} | {r['tokens']} | {r['fid']:.1f} ({r['n']} / {r['n_real']}) | "
                  f"{r['kid']:.3f} | {r['images_per_s']:.1f} |")
        for r in report["not applicable"]:
            print(f"| {name} | {r['table']}: not applicable ({r['why']}) | | | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=int, choices=(1, 2, 5), required=True)
    ap.add_argument("--steps", type=int, default=1000, help="tokenizer training steps (every variant)")
    ap.add_argument("--gen-steps", type=int, default=1000, help="AR-SIT training steps (Table 2)")
    ap.add_argument("--experiment", default="sit-tables")
    ap.add_argument("--variants", nargs="*", help="only these rows of Table 1 / 5 (by name; finished runs are reused)")
    args = ap.parse_args()
    # VQGAN's 64-channel discriminator, as every table row so far (the demo halves it for time)
    base = [f"tracking.experiment={args.experiment}", f"tokenizer.train.max_steps={args.steps}",
            "tokenizer.train.disc_channels=64"]
    if args.table in (1, 5):
        variants = TABLE1 if args.table == 1 else table_variants(TABLE5)
        unknown = set(args.variants or ()) - set(variants)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; Table {args.table} has {list(variants)}")
        chosen = {k: v for k, v in variants.items() if not args.variants or k in args.variants}
        print_reconstruction(tokenizer_rows(base, chosen),
                             f"SIT Table {args.table} in miniature ({args.steps} steps, full objective)")
    else:
        table2(base, args.gen_steps)


if __name__ == "__main__":
    main()
