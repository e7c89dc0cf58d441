"""Masked token modelling (MaskGIT, Chang et al. 2022; CQ seed §3.3): the training mask, the loss
and confidence-based iterative decoding.

Training: each sequence gets r ~ U(0, 1) and ⌈γ(r)·L⌉ random positions masked (γ = cosine
schedule, at least one); cross-entropy on the masked positions only.

Decoding in T steps: start fully masked; at step t every masked position samples a token (after
temperature and top-k/top-p); tokens fixed earlier stay fixed; then the ⌊γ((t+1)/T)·L⌋ sampled tokens
of lowest confidence are masked again (at least one while masked tokens remain, none after the last
step). Confidence = log-probability of the sampled token + Gumbel noise scaled by
``choice_temperature``·(1 − (t+1)/T) (MaskGIT's annealed noise; 4.5 is MaskGIT's default).
Classifier-free guidance: ℓ = t·ℓ_c − (t−1)·ℓ_u (CQ seed eq. 4, = ``sampling.guided_logits``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from coarse2fine.train.models.maskgit import cosine_mask_ratio
from coarse2fine.train.sampling import filter_logits, guided_logits

CHOICE_TEMPERATURE = 4.5  # MaskGIT's default Gumbel scale on the confidences


def random_mask(ids_BL: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, mask (B, L) bool): ⌈γ(r)·L⌉ random positions per row, r ~ U(0, 1)."""
    B, L = ids_BL.shape
    r = torch.rand(B, generator=generator, device=ids_BL.device)
    n = torch.ceil(cosine_mask_ratio(r) * L).clamp(1, L)  # (B,)
    order = torch.rand(B, L, generator=generator, device=ids_BL.device).argsort(dim=1).argsort(dim=1)  # random ranks
    mask = order < n[:, None]
    return ids_BL.masked_fill(mask, mask_id), mask


def masked_loss(model, ids_BL: torch.Tensor, cond_B: torch.Tensor, mask_id: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the masked positions (MaskGIT's objective) and the masked share."""
    masked, mask = random_mask(ids_BL, mask_id)
    logits = model(masked, cond_B)  # (B, L, K)
    loss = F.cross_entropy(logits[mask].float(), ids_BL[mask])
    return loss, {"masked_fraction": mask.float().mean().detach()}


@torch.no_grad()
def decode(model, cond_B: torch.Tensor, steps: int, guidance: float = 1.0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None,
           choice_temperature: float = CHOICE_TEMPERATURE) -> torch.Tensor:
    """Token ids (B, L) by confidence-based iterative decoding in ``steps`` steps."""
    assert steps >= 1 and temperature > 0, "steps must be >= 1 and temperature positive"
    model.eval()
    cfg = model.cfg
    B, L = cond_B.shape[0], cfg.seq_len
    ids = torch.full((B, L), cfg.mask_id, dtype=torch.long, device=cond_B.device)
    guided = guidance != 1.0
    cond = torch.cat([cond_B, torch.full_like(cond_B, cfg.null_class)]) if guided else cond_B
    for t in range(steps):
        logits = model(torch.cat([ids, ids]) if guided else ids, cond).float()  # (B or 2B, L, K)
        if guided:
            logits = guided_logits(*logits.chunk(2), guidance)
        logits = filter_logits((logits / temperature).flatten(0, 1), top_k, top_p)  # (B·L, K)
        probs = logits.softmax(-1)
        sampled = torch.multinomial(probs, 1, generator=generator).view(B, L)
        masked = ids == cfg.mask_id
        sampled = torch.where(masked, sampled, ids)  # fixed tokens stay
        ratio = (t + 1) / steps
        remaining = int(masked[0].sum())  # every row has as many masked tokens
        n_mask = 0 if t == steps - 1 else min(max(1, math.floor(cosine_mask_ratio(ratio) * L)), remaining - 1)
        if n_mask <= 0:
            ids = sampled
            continue
        logp = probs.clamp_min(1e-30).log().gather(1, sampled.view(-1, 1)).view(B, L)
        u = torch.rand(B, L, generator=generator, device=ids.device).clamp(1e-20, 1 - 1e-7)
        confidence = logp + choice_temperature * (1 - ratio) * -torch.log(-torch.log(u))  # + Gumbel noise
        confidence = confidence.masked_fill(~masked, float("inf"))  # never re-mask a fixed token
        lowest = confidence.topk(n_mask, dim=1, largest=False).indices  # (B, n_mask)
        ids = sampled.scatter(1, lowest, cfg.mask_id)
    return ids
