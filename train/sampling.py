"""Sampling AR-SIT token sequences: KV-cached, classifier-free guidance, temperature / top-k / top-p,
early stop after a scale (coarse previews) and given prefixes (refine, upsampling, editing).

CFG follows Parti/LlamaGen: the batch is run twice, with the class and with the null class, and
the logits mixed as ``uncond + scale · (cond − uncond)`` (constant scale over the sequence, as
Parti). Top-k / top-p filtering follows the HF/nanoGPT convention and is applied after temperature.
Random numbers come from one ``torch.Generator`` drawn once per token, so cached and uncached
sampling with the same seed consume them identically and give the same tokens.
"""

from __future__ import annotations

import torch

from coarse2fine.train.models.arsit import ARSIT


def guided_logits(cond_BV: torch.Tensor, uncond_BV: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance; ``scale == 1`` is the conditional model."""
    return uncond_BV + scale * (cond_BV - uncond_BV)


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probability reaches ``top_p``."""
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits_BV, descending=True, dim=-1)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits_BV = logits_BV.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits_BV


@torch.no_grad()
def sample_tokens(
    model: ARSIT,
    cond_B: torch.Tensor,
    num_tokens: int,
    prefix_BP: torch.Tensor | None = None,
    guidance: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Token ids (B, num_tokens): the given prefix unchanged, then sampled tokens.

    ``num_tokens = s · N`` stops after scale s (a coarse image for a scale-causal decoder).
    """
    model.eval()
    B = cond_B.shape[0]
    ids = prefix_BP if prefix_BP is not None else torch.zeros(B, 0, dtype=torch.long, device=cond_B.device)
    assert ids.shape[1] <= num_tokens <= model.cfg.seq_len, "prefix longer than the requested sequence"
    assert temperature > 0, "temperature must be positive"
    guided = guidance != 1.0
    cond = torch.cat([cond_B, torch.full_like(cond_B, model.cfg.null_class)]) if guided else cond_B
    cache = model.new_cache() if use_cache else None
    while ids.shape[1] < num_tokens:
        logits = model.next_logits(torch.cat([ids, ids]) if guided else ids, cond, cache)  # (B or 2B, V)
        if guided:
            logits = guided_logits(*logits.float().chunk(2), guidance)
        probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
