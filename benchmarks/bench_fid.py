"""FID benchmark: Inception feature throughput and end-to-end FID/KID time, ours vs torchmetrics.

    python benchmarks/bench_fid.py [--device cpu|cuda] [--n 2000] [--throughput-n 256]
                                   [--reference-n 256] [--weights PATH]

1. Feature extraction throughput (images/s) of the TF-2015 Inception network on 299×299 inputs at
   batch 32 and 64, through our wrapper and through the bare TorchScript network (ratio = overhead).
2. FID + KID of two sets of real-photo crops (64×64, different seeds), n vs n, end to end (features
   + statistics), our Evaluator.
3. The same FID through torchmetrics' FrechetInceptionDistance with our extractor (the reference),
   on ``--reference-n`` images per side: time ratio and FID difference.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from coarse2fine.evaluate.config import EvaluateConfig
from coarse2fine.evaluate.fid import Evaluator
from coarse2fine.evaluate.metrics import FeatureStats, frechet_distance
from coarse2fine.preprocess.demo_data import demo_crops


def crops(n: int, seed: int, res: int = 64) -> torch.Tensor:
    arr = np.stack([np.asarray(c, np.float32) / 255 for _, c in demo_crops(n, res, seed)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def batches(x: torch.Tensor, bs: int):
    return [x[i : i + bs] for i in range(0, len(x), bs)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(ev: Evaluator, n: int, bs: int) -> tuple[float, float]:
    x = torch.rand(n, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    ext = ev.extractor.to(ev.device)
    net = ext.net
    with torch.no_grad():
        for _ in range(3):  # warm-up: TorchScript's profiling executor optimises after a few calls
            ext(x[:bs].to(ev.device))
            net((x[:bs].to(ev.device) * 255 - 128) / 128)
        sync(ev.device)
        t = time.perf_counter()
        for b in batches(x, bs):
            ext(b.to(ev.device))
        sync(ev.device)
        ours = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for b in batches(x, bs):
            net((b.to(ev.device) * 255 - 128) / 128)
        sync(ev.device)
        bare = n / (time.perf_counter() - t)
    return ours, bare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--throughput-n", type=int, default=256)
    p.add_argument("--reference-n", type=int, default=256)
    p.add_argument("--weights", default=None)
    args = p.parse_args()
    ev = Evaluator(EvaluateConfig(device=args.device, fid_weights=args.weights, batch_size=64))
    name = torch.cuda.get_device_name() if ev.device.type == "cuda" else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    print(f"device: {ev.device} — {name}; torch {torch.__version__}\n")

    print("| batch | ours (img/s) | bare TorchScript (img/s) | ours / bare |\n|---|---|---|---|")
    for bs in (32, 64):
        ours, bare = throughput(ev, args.throughput_n, bs)
        print(f"| {bs} | {ours:.1f} | {bare:.1f} | {ours / bare:.2f} |")

    real, fake = crops(args.n, seed=1), crops(args.n, seed=2)
    t = time.perf_counter()
    f_real, f_fake = ev.features(batches(real, 64)), ev.features(batches(fake, 64))
    t_feat = time.perf_counter() - t
    res = ev.compare_features(f_real, f_fake)
    e2e = time.perf_counter() - t
    t = time.perf_counter()
    fid_only = frechet_distance(FeatureStats.from_features(f_real), FeatureStats.from_features(f_fake))
    t_fid = time.perf_counter() - t
    print(f"\nend to end, {args.n} vs {args.n} (64×64 crops): FID {res.fid:.3f}, KID {res.kid_mean:.5f} "
          f"± {res.kid_std:.5f} ({ev.cfg.kid_subsets} subsets of {ev.cfg.kid_subset_size}): {e2e:.1f} s "
          f"= features {t_feat:.1f} s + FID statistics {t_fid:.1f} s + KID {e2e - t_feat - t_fid:.1f} s")
    assert abs(fid_only - res.fid) < 1e-9

    m = args.reference_n
    t = time.perf_counter()
    f_r, f_f = ev.features(batches(real[:m], 64)), ev.features(batches(fake[:m], 64))
    ours = frechet_distance(FeatureStats.from_features(f_r), FeatureStats.from_features(f_f))
    t_ours = time.perf_counter() - t
    metric = FrechetInceptionDistance(feature=ev.extractor, normalize=True).to(ev.device)
    t = time.perf_counter()
    for b in batches(real[:m], 64):
        metric.update(b.to(ev.device), real=True)
    for b in batches(fake[:m], 64):
        metric.update(b.to(ev.device), real=False)
    ref = float(metric.compute())
    t_ref = time.perf_counter() - t
    print(f"\nFID only (features + statistics), same images:\n\n| {m} vs {m} | FID | seconds |\n|---|---|---|\n| ours | {ours:.4f} | {t_ours:.1f} |\n"
          f"| torchmetrics (reference) | {ref:.4f} | {t_ref:.1f} |\n"
          f"time ratio reference/ours {t_ref / t_ours:.2f}, |ΔFID| = {abs(ours - ref):.2e}")


if __name__ == "__main__":
    main()
