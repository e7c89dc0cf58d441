"""Plain train/eval steps (no Ray, no MLflow): the Ray loop and the CLI are thin wrappers around them."""

from __future__ import annotations

import math

import torch

from coarse2fine.train.losses import (LossWeights, adaptive_weight, discriminator_hinge, generator_hinge,
                                      lecam_regularizer, reconstruction_loss)


def warmup_cosine(total_steps: int, warmup_frac: float = 0.1, schedule: str = "cosine",
                  final_lr_frac: float = 0.01):
    """LR multiplier: linear warm-up over the first ``warmup_frac`` of the steps, then cosine to 0
    (ViT-VQGAN / SIT protocol, seed B.1) or, with ``schedule="exponential"``, exponential decay
    reaching ``final_lr_frac`` at the last step (AR-SIT, seed B.2)."""
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "exponential":
            return final_lr_frac ** progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def tokenizer_train_step(model, optimizer, scheduler, x_B3HW: torch.Tensor, weights: LossWeights,
                         clip_norm: float = 1.0, step: int = 0, disc=None, disc_optimizer=None,
                         groups: list[tuple[str, int, int]] = (), bases: torch.Tensor | None = None,
                         perceptual: torch.nn.Module | None = None, last_layer: list[torch.Tensor] = ()
                         ) -> dict[str, torch.Tensor | float]:
    """One optimisation step on a batch of images in [0, 1] (and their Mumford–Shah ``bases`` for
    a model that takes them, CART); returns scalar metrics, including the share of each token
    group's codebook used by the batch (collapse shows from the first step): ``groups`` =
    (name, vocabulary, tokens) of the groups in the model's flat indices. The metrics stay on the
    device as 0-dim tensors (the learning rate is a float): :func:`to_floats` copies them at once.

    Reconstruction loss = L2 (+ the ``perceptual`` distance). With a discriminator (and ``step >=
    weights.adversarial_start``) the tokenizer also gets the hinge generator loss, scaled by VQGAN's
    adaptive weight over the decoder's ``last_layer`` parameters, and the discriminator one hinge
    step on real vs reconstructed images.
    """
    model.train()
    recon, indices, losses = model(x_B3HW) if bases is None else model(x_B3HW, bases)
    l2 = reconstruction_loss(recon, x_B3HW)
    rec = weights.l2 * l2
    scalars = {"l2": l2, **losses}
    if perceptual is not None and weights.perceptual > 0:
        p_loss = perceptual(recon, x_B3HW).mean()
        rec = rec + weights.perceptual * p_loss
        scalars["perceptual"] = p_loss
    loss = rec + losses["aux"]
    adversarial = disc is not None and weights.adversarial > 0 and step >= weights.adversarial_start
    if adversarial:
        g_adv = generator_hinge(disc(recon))
        w = adaptive_weight(rec, g_adv, list(last_layer)) if weights.adaptive else torch.ones(())
        loss = loss + weights.adversarial * w * g_adv
        scalars |= {"g_adv": g_adv, "adaptive_weight": w}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    if adversarial:
        logits = disc(torch.cat([x_B3HW, recon.detach()]))  # one forward (DDP-friendly)
        real, fake = logits.chunk(2)
        d_loss = discriminator_hinge(real, fake)
        if weights.lecam > 0:
            d = unwrap(disc)
            lecam = lecam_regularizer(real, fake, d.ema_real, d.ema_fake)
            d_loss = d_loss + weights.lecam * lecam
            scalars["lecam"] = lecam
        disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_optimizer.step()
        scalars["d_loss"] = d_loss
    scalars["loss"] = loss
    for ids, (name, vocab, _) in zip(group_ids(indices, groups), groups):
        scalars[f"batch_usage/{name}"] = codes_used(ids, vocab) / vocab
    return {k: v.detach() for k, v in scalars.items()} | {"lr": scheduler.get_last_lr()[0]}


def codes_used(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """How many of the ``vocab`` codes occur in ``ids`` (a 0-dim tensor; static shapes, unlike
    ``unique()``, so an XLA graph keeps it)."""
    return ids.new_zeros(vocab).index_fill_(0, ids.flatten(), 1).sum()


def to_floats(scalars: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """A step's metrics (0-dim tensors, wherever they live, and floats) → floats in one
    device-to-host copy, in float64: one sync per step on CUDA, and on XLA no graph of its own when
    called after the step's ``torch_xla.sync()`` (an ``.item()`` per metric costs one each)."""
    keys = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
    dev = scalars[keys[0]].device if keys else None
    values = torch.stack([scalars[k].detach().to(dev, torch.float64).reshape(()) for k in keys]).tolist() if keys else []
    return {k: float(v) for k, v in scalars.items() if k not in keys} | dict(zip(keys, values))


def group_ids(indices: torch.Tensor, groups: list[tuple[str, int, int]]) -> list[torch.Tensor]:
    """Token ids (B, …) → one (B, n_g) tensor per (name, vocabulary, tokens) group of the layout
    (``methods.base.usage_groups``), in sequence order."""
    return list(indices.reshape(len(indices), -1).split([n for _, _, n in groups], dim=1)) if groups else []


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def tokenizer_eval_step(model, x_B3HW: torch.Tensor, bases: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction (clamped to [0, 1]) and token ids of a batch."""
    model.eval()
    recon, indices, _ = model(x_B3HW) if bases is None else model(x_B3HW, bases)
    return recon.clamp(0, 1), indices


def drop_condition(labels_B: torch.Tensor, null_class: int, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability ``prob`` (classifier-free guidance
    training, Parti/LlamaGen: 0.1)."""
    drop = torch.rand(labels_B.shape, generator=generator, device=labels_B.device) < prob
    return torch.where(drop, torch.full_like(labels_B, null_class), labels_B)


def generator_train_step(model, optimizer, scheduler, tokens: torch.Tensor, labels_B: torch.Tensor, loss_fn,
                         clip_norm: float = 1.0) -> dict[str, torch.Tensor | float]:
    """One step of the generator method's loss ``loss_fn(model, tokens, cond) -> (loss, parts)`` on
    a batch of token sequences; the condition is dropped to the null class at the model's
    ``cond_drop_prob`` (classifier-free guidance training). Metrics as in :func:`tokenizer_train_step`."""
    model.train()
    cfg = unwrap(model).cfg
    cond = drop_condition(labels_B, cfg.null_class, cfg.cond_drop_prob)
    loss, parts = loss_fn(model, tokens, cond)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    parts = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in parts.items()}
    return {"loss": loss.detach(), "grad_norm": grad_norm, **parts, "lr": scheduler.get_last_lr()[0]}
