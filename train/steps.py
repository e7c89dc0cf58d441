"""Plain train/eval steps (no Ray, no MLflow): the Ray loop and the CLI are thin wrappers around them."""

from __future__ import annotations

import math

import torch

from coarse2fine.train.losses import LossWeights, reconstruction_loss


def warmup_cosine(total_steps: int, warmup_frac: float = 0.1):
    """LR multiplier: linear warm-up over the first ``warmup_frac`` of the steps, then cosine to 0
    (ViT-VQGAN / SIT protocol, seed B.1)."""
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def tokenizer_train_step(model, optimizer, scheduler, x_B3HW: torch.Tensor, weights: LossWeights,
                         clip_norm: float = 1.0) -> dict[str, float]:
    """One optimisation step on a batch of images in [0, 1]; returns scalar metrics."""
    model.train()
    recon, _, aux, terms = model(x_B3HW)
    l2 = reconstruction_loss(recon, x_B3HW)
    loss = weights.l2 * l2 + aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    scalars = {"loss": loss, "l2": l2, "aux": aux, "grad_norm": grad_norm, **terms}
    return {k: v.item() for k, v in scalars.items()} | {"lr": scheduler.get_last_lr()[0]}


@torch.no_grad()
def tokenizer_eval_step(model, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction (clamped to [0, 1]) and token ids of a batch."""
    model.eval()
    recon, indices, _, _ = model(x_B3HW)
    return recon.clamp(0, 1), indices
