"""What each part of the tokenizer objective costs per training step, for the demo's tokenizers.

For every tokenizer of ``configs/demo.yaml``'s pairs (demo sizes, batch ``tokenizer.train.batch_size``,
``torch_threads`` threads), one ``tokenizer_train_step`` is timed with: L2 + the quantizer's loss
only; + the perceptual distance the demo resolves; + the adversarial loss (past its start) with
VQGAN's discriminator (64 channels, 3 layers) and with narrower / shallower ones. The rows show where
the demo's minutes go; the images are demo photographs, CART's bases random (timing only).

    python benchmarks/objective_cost.py [--steps 5] [--methods sit cq cart kl]
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import demo_config
from coarse2fine.train import methods
from coarse2fine.train.losses import LossWeights, build_perceptual, resolve_perceptual
from coarse2fine.train.models.discriminator import PatchDiscriminator
from coarse2fine.train.steps import tokenizer_train_step

DISCS = [(64, 3), (32, 3), (32, 2)]


def demo_batch(folder: str, n: int, resolution: int) -> torch.Tensor:
    """(n, 3, r, r) demo photographs in [0, 1], resized as ingest does."""
    files = sorted(Path(folder).rglob("*.png"))[:n]
    arrays = [np.asarray(Image.open(io.BytesIO(f.read_bytes())).convert("RGB").resize((resolution, resolution)))
              for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def step_seconds(method, model_cfg, x, bases, weights, perceptual, disc, steps: int) -> float:
    model = method.build(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4) if disc is not None else None
    last = method.last_layer(model)
    times = []
    for i in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        tokenizer_train_step(model, opt, sched, x, weights, 1.0, 1, disc, disc_opt, (), bases, perceptual, last)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=None, help="tokenizer methods (default: the demo pairs')")
    args = ap.parse_args()
    cfg = demo_config([])
    train = cfg.tokenizer.train
    torch.set_num_threads(train.torch_threads)
    torch.manual_seed(0)
    pairs = {c.tokenizer.method: c for _, c in cfg.pair_configs()}  # each pair's tokenizer, with its overrides
    names = args.methods or list(pairs)
    x = demo_batch(cfg.data.source, train.batch_size, cfg.data.resolution)
    choice = resolve_perceptual(train.perceptual, train.perceptual_weight, train.lpips_backbone)
    distance = build_perceptual(choice)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, batch {len(x)}, "
          f"{cfg.data.resolution} px, perceptual = {choice.kind}; median of {args.steps} steps (s)\n")
    header = ["tokenizer", "L2 + quantizer", f"+ perceptual ({choice.kind})"] + [
        f"+ adversarial (disc {c}×{n})" for c, n in DISCS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names:
        method = methods.get("tokenizer", name)
        model_cfg = method.model_config(getattr(pairs.get(name, cfg).tokenizer, name), cfg.data.resolution)
        k = method.factors(model_cfg)
        bases = torch.rand(len(x), k, *x.shape[1:]) if k else None
        plain = LossWeights(perceptual=0.0, adversarial=0.0)
        full = LossWeights(perceptual=train.perceptual_weight, adversarial=train.adversarial_weight)
        row = [step_seconds(method, model_cfg, x, bases, plain, None, None, args.steps),
               step_seconds(method, model_cfg, x, bases, full, distance, None, args.steps)]
        for c, n in DISCS:
            row.append(step_seconds(method, model_cfg, x, bases, full, distance, PatchDiscriminator(c, n), args.steps))
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in row) + " |", flush=True)


if __name__ == "__main__":
    main()
