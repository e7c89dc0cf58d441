"""CQ seed Tables 6a, 6b and 7 in miniature, on the demo data through the real pipeline
(Beam → Ray Train → MLflow), every variant with the same data, steps and optimiser.

    python benchmarks/cq_tables.py [--steps 1000] [--size mini] [--gen-steps 1000] [--gen-size mini]

Table 6a: CQ vs the spatial VQ on the same conv autoencoder and codebook size K (code dimension C
and 8). Table 6b: CQ at two codebook sizes. Codebook usage and the unique-token ratio (CQ's
definition: per image, distinct tokens / tokens, averaged) are computed over the whole tokens
dataset; PSNR, SSIM and rFID over the held-out split (n printed). Table 7: MaskGIT on the CQ tokens,
FID/KID and images/s at 10 decoding steps and at one token per step. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import demo_config
from coarse2fine.pipelines import stages
from coarse2fine.preprocess import schema



def token_stats(tokens_uri: str, vocab: int) -> dict[str, float]:
    ids = schema.tensor_numpy(schema.read_table(tokens_uri, ["ids"]).column("ids"))
    flat = ids.reshape(len(ids), -1)  # (images, tokens)
    per_image = [np.unique(row).size / row.size for row in flat]
    return {"usage": np.unique(flat).size / vocab, "unique_ratio": float(np.mean(per_image)), "images": len(flat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="tokenizer training steps (every variant)")
    ap.add_argument("--size", default="mini", help="conv autoencoder size (train/models/conv_vq.py)")
    ap.add_argument("--gen-steps", type=int, default=1000, help="MaskGIT training steps")
    ap.add_argument("--gen-size", default="mini", help="MaskGIT size (train/models/maskgit.py)")
    ap.add_argument("--experiment", default="cq-tables")
    args = ap.parse_args()
    base = [f"tracking.experiment={args.experiment}", f"tokenizer.train.max_steps={args.steps}",
            f"tokenizer.cq.size={args.size}", f"tokenizer.vqgan.size={args.size}"]
    cfg = demo_config(base)
    variants = {
        "CQ (channel), K=512": ["tokenizer.method=cq"],
        "spatial VQ, dim 64, K=512": ["tokenizer.method=vqgan"],
        "spatial VQ, dim 8, K=512": ["tokenizer.method=vqgan", "tokenizer.vqgan.code_dim=8"],
        "CQ (channel), K=1024": ["tokenizer.method=cq", "tokenizer.cq.codebook_size=1024"],
    }
    rows, cq_run = [], None
    for name, overrides in variants.items():
        cfg = demo_config(base + overrides)
        t = time.perf_counter()
        ref = stages.train_tokenizer(cfg)
        seconds = time.perf_counter() - t
        top = stages.evaluate_tokenizer(cfg, ref.run_id)[0]
        tokens = stages.tokenize(cfg, ref.run_id).uris["tokens"]
        vocab = cfg.tokenizer.params().codebook_size
        rows.append({"tokenizer": name, **token_stats(tokens, vocab), "psnr": top["psnr"], "ssim": top["ssim"],
                     "rfid": top.get("rfid", float("nan")), "n": top["n"], "train_s": seconds, "run": ref.run_id})
        if name.startswith("CQ (channel), K=512"):
            cq_run, cq_tokens = ref.run_id, tokens
    print(f"\n### CQ Tables 6a/6b in miniature ({args.steps} steps, conv size {args.size}, demo data 64 px)\n")
    print("| tokenizer | codebook usage | unique ratio | PSNR | SSIM | rFID (n) | train s | run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['usage']:.1%} | {r['unique_ratio']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['rfid']:.1f} ({r['n']}) | {r['train_s']:.0f} | {r['run'][:8]} |")
    gen_cfg = demo_config(base + variants["CQ (channel), K=512"] + [
        "generator.method=maskgit", f"generator.maskgit.size={args.gen_size}",
        f"generator.train.max_steps={args.gen_steps}"])
    gen = stages.train_generator(gen_cfg, tokenizer_run=cq_run, tokens_uri=cq_tokens)
    report = stages.evaluate_generator(gen_cfg, gen.run_id)["steps"]
    print(f"\n### CQ Table 7 in miniature (MaskGIT {args.gen_size}, {args.gen_steps} steps, run {gen.run_id[:8]})\n")
    print("| decoding steps | FID | KID | n (fake / real) | images/s |")
    print("|---|---|---|---|---|")
    for r in report:
        print(f"| {r['steps']} | {r['fid']:.1f} | {r['kid']:.4f} | {r['n']} / {r['n_real']} | {r['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
