"""Plain train/eval steps (no Ray, no MLflow): the Ray loop and the CLI are thin wrappers around them."""

from __future__ import annotations

import math

import torch

from coarse2fine.train.losses import LossWeights, discriminator_hinge, generator_hinge, reconstruction_loss


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
                         clip_norm: float = 1.0, step: int = 0, disc=None, disc_optimizer=None) -> dict[str, float]:
    """One optimisation step on a batch of images in [0, 1]; returns scalar metrics, including the
    share of each scale's codebook used by the batch (collapse shows from the first step).

    With a discriminator (and ``step >= weights.adversarial_start``) the tokenizer also gets the
    hinge generator loss and the discriminator one hinge step on real vs reconstructed images.
    """
    model.train()
    recon, indices, aux, terms = model(x_B3HW)
    l2 = reconstruction_loss(recon, x_B3HW)
    loss = weights.l2 * l2 + aux
    adversarial = disc is not None and weights.adversarial > 0 and step >= weights.adversarial_start
    scalars = {"l2": l2, "aux": aux, **terms}
    if adversarial:
        g_adv = generator_hinge(disc(recon))
        loss = loss + weights.adversarial * g_adv
        scalars["g_adv"] = g_adv
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    if adversarial:
        logits = disc(torch.cat([x_B3HW, recon.detach()]))  # one forward (DDP-friendly)
        d_loss = discriminator_hinge(*logits.chunk(2))
        disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_optimizer.step()
        scalars["d_loss"] = d_loss
    scalars["loss"] = loss
    k = unwrap(model).cfg.codebook_size
    usage = {f"batch_usage/scale_{s}": indices[:, s].unique().numel() / k for s in range(indices.shape[1])}
    return {k: v.item() for k, v in scalars.items()} | usage | {"lr": scheduler.get_last_lr()[0]}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def tokenizer_eval_step(model, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction (clamped to [0, 1]) and token ids of a batch."""
    model.eval()
    recon, indices, _, _ = model(x_B3HW)
    return recon.clamp(0, 1), indices
