"""SIT training steps on XLA:CPU (torch_xla) vs eager CPU, in one process (issue #17's XLA path).

    make xla-env && PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/bench_xla.py [--steps 10]

The demo's SIT-SC (``configs/demo.yaml``: 64 px, 3 scales × 16 tokens, its size and codebook) on
random images, ``steps.tokenizer_train_step`` with L2 + MS-SSIM perceptual + quantizer terms (the
adversarial term off; the Inception stem is TorchScript, which XLA cannot run), AdamW. For each
device: the first step (XLA traces and compiles its graph there), and the median of the following
steps; XLA steps end with ``torch_xla.sync()`` as the training loop's do. Also the largest
difference of the losses between the two devices over the run (same seed, same batches), and how
many XLA graphs were compiled (a count that grows with the steps would mean recompilation) and
executed per step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from common import demo_config
from coarse2fine.train import methods
from coarse2fine.train.losses import LossWeights, PerceptualChoice, build_perceptual
from coarse2fine.train.steps import to_floats, tokenizer_train_step


def run(device: torch.device, steps: int, batch: int, end_step) -> tuple[list[float], list[float]]:
    """(seconds per step, losses) of ``steps`` steps from the same seed."""
    cfg = demo_config([])
    method = methods.tokenizer("sit")
    torch.manual_seed(0)
    model = method.build(method.model_config(cfg.tokenizer.sit, cfg.data.resolution)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    distance = build_perceptual(PerceptualChoice("ms_ssim")).to(device)
    weights = LossWeights(perceptual=cfg.tokenizer.train.perceptual_weight, adversarial=0.0)
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    for _ in range(steps):
        x = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution, generator=g).to(device)
        t = time.perf_counter()
        metrics = tokenizer_train_step(model, opt, sched, x, weights, perceptual=distance)
        end_step()
        metrics = to_floats(metrics)
        times.append(time.perf_counter() - t)
        losses.append(metrics["loss"])
    return times, losses


def main() -> None:
    import torch_xla
    import torch_xla.debug.metrics as met

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    xla = torch_xla.device()  # before the first backward: autograd sizes its device queues then
    eager_t, eager_l = run(torch.device("cpu"), args.steps, args.batch, lambda: None)
    xla_t, xla_l = run(xla, args.steps, args.batch, torch_xla.sync)
    print(f"# {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torch_xla {torch_xla.__version__}, batch {args.batch}, {args.steps} steps\n")
    print("| device | first step s | median later step s | eager / this |\n|---|---|---|---|")
    for name, t in (("eager CPU", eager_t), ("XLA:CPU", xla_t)):
        later = statistics.median(t[1:])
        print(f"| {name} | {t[0]:.3f} | {later:.3f} | {statistics.median(eager_t[1:]) / later:.2f} |")
    print(f"\nlargest |loss difference| over the run: {max(abs(a - b) for a, b in zip(eager_l, xla_l)):.2e} "
          f"(losses {eager_l[0]:.4f} → {eager_l[-1]:.4f})")
    compiled, executed = met.metric_data("CompileTime")[0], met.metric_data("ExecuteTime")[0]
    print(f"XLA graphs compiled: {compiled} (all in the first two steps when the count stays flat); "
          f"graphs executed per step: {executed / args.steps:.1f} (every host copy of a value runs the graph it needs)")


if __name__ == "__main__":
    main()
