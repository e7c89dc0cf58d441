"""One tokenizer training step with the kernels on vs forced to their torch references (``train.kernels:
reference``), eager and under ``torch.compile``, in one process.

    python benchmarks/bench_train_step.py [--steps 5] [--methods sit cq] [--no-compile]

Each row times ``steps.tokenizer_train_step`` (L2 + the quantizer's terms; the perceptual and
adversarial terms are off because they use no kernel of ours) on random images under bf16
autocast on GPU (``train.bf16``, as the training loop does), with AdamW:

* ``sit``: 256 px, 5 scales × 256 tokens (seed Table 1's SIT-SC layout), size ``small``, a 16,384
  codebook: the Haar DWT kernel (its 1280 tokens take SDPA + mask, the faster there, see
  ``kernels/attention.py``; its quantizer's entropy term needs all N×K similarities, so it takes no
  fused nearest-code search);
* ``vqgan``: the spatial VQ baseline at 256 px, f = 16, a 16,384 codebook of 8-dim codes
  (LlamaGen's), conv size ``small``: the fused nearest-code search. (CQ's 256-dim codes take the
  kernel only when the scores would not fit, ``kernels/nearest_code.py``, so at this size both of
  its rows would run the same ops.)

Columns: seconds per step (median of ``--steps`` after two warm-up steps) with the references, with
the kernels as chosen automatically, and with FlexAttention at every sequence length (the attention
rule's ``FLEX_MIN_TOKENS`` came from an op-level benchmark); ratios to the references. A second
table gives the same under ``torch.compile(model)`` (or the error, if it fails). Weights and images
are random: step time does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

from coarse2fine.train import kernels, methods
from coarse2fine.train.kernels import attention
from coarse2fine.train.losses import LossWeights
from coarse2fine.train.steps import tokenizer_train_step

CASES = {
    "sit": dict(num_scales=5, tokens_per_scale=256, size="small", codebook_size=16384),
    "vqgan": dict(size="small", downsample=16, z_channels=64, codebook_size=16384, code_dim=8),
}
RESOLUTION = 256


def step_seconds(name: str, device: torch.device, batch: int, steps: int, reference: bool, compiled: bool,
                 flex_any_length: bool = False) -> float:
    """Median seconds per step; ``flex_any_length`` lowers ``attention.FLEX_MIN_TOKENS`` to 0 for the run."""
    method = methods.tokenizer(name)
    torch.manual_seed(0)
    model = method.build(method.model_config(method.params(**CASES[name]), RESOLUTION)).to(device)
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.rand(batch, 3, RESOLUTION, RESOLUTION, device=device)
    weights = LossWeights(perceptual=0.0, adversarial=0.0)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    kernels.force_reference(reference)
    flex_min, attention.FLEX_MIN_TOKENS = attention.FLEX_MIN_TOKENS, 0 if flex_any_length else attention.FLEX_MIN_TOKENS
    try:
        times = []
        for _ in range(steps + 2):  # two warm-up steps (compilation, autotuning)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with autocast:
                tokenizer_train_step(run, opt, sched, x, weights)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    finally:
        kernels.force_reference(False)
        attention.FLEX_MIN_TOKENS = flex_min
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# {name}, torch {torch.__version__}, batch {args.batch}, {RESOLUTION} px; s/step, median of {args.steps}\n")
    for compiled in (False, True) if not args.no_compile else (False,):
        print(f"\n{'compiled' if compiled else 'eager'}:\n")
        print("| method | reference | kernels | reference / kernels | kernels, FlexAttention at any length | ratio |")
        print("|---|---|---|---|---|---|")
        for method in args.methods:
            try:
                ref, ker, flex = (step_seconds(method, device, args.batch, args.steps, r, compiled, f)
                                  for r, f in ((True, False), (False, False), (False, True)))
                print(f"| {method} | {ref:.4f} | {ker:.4f} | {ref / ker:.2f} | {flex:.4f} | {ref / flex:.2f} |", flush=True)
            except Exception as e:  # a compile failure is a result to report, not a crash
                print(f"| {method} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | – | – | – | – |", flush=True)


if __name__ == "__main__":
    main()
