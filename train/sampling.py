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
from coarse2fine.train.models.blocks import KVCache


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
    cuda_graph: bool | None = None,
    compile_step: bool = False,
) -> torch.Tensor:
    """Token ids (B, num_tokens): the given prefix unchanged, then sampled tokens.

    ``num_tokens = s · N`` stops after scale s (a coarse image for a scale-causal decoder). With the
    cache, one call runs the condition and the prefix, then one ``ARSIT.decode_step`` per token; on
    CUDA that step is captured once in a CUDA graph and replayed (``cuda_graph``, default: on CUDA),
    after ``torch.compile`` if ``compile_step`` (see :func:`_cached_step`). Without the cache every
    token reruns the whole prefix (the reference).
    """
    model.eval()
    B = cond_B.shape[0]
    ids = prefix_BP if prefix_BP is not None else torch.zeros(B, 0, dtype=torch.long, device=cond_B.device)
    assert ids.shape[1] <= num_tokens <= model.cfg.seq_len, "prefix longer than the requested sequence"
    assert temperature > 0, "temperature must be positive"
    if ids.shape[1] == num_tokens:
        return ids
    guided = guidance != 1.0
    cond = torch.cat([cond_B, torch.full_like(cond_B, model.cfg.null_class)]) if guided else cond_B

    def rows(x_BT: torch.Tensor) -> torch.Tensor:  # the model's batch: twice the images under CFG
        return torch.cat([x_BT, x_BT]) if guided else x_BT

    cache = model.new_cache(len(cond), num_tokens) if use_cache else None  # input positions 0 … num_tokens − 1
    if use_cache and num_tokens - ids.shape[1] >= 2:  # a step to replay; captured before the prefill (_cached_step)
        step = _cached_step(model, cache, cond_B.is_cuda if cuda_graph is None else cuda_graph, compile_step)
    logits = model.next_logits(rows(ids), cond, cache)  # (B or 2B, V): the condition and the prefix
    while True:
        if guided:
            logits = guided_logits(*logits.float().chunk(2), guidance)
        probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
        if ids.shape[1] == num_tokens:
            return ids
        logits = step(rows(nxt), ids.shape[1]) if use_cache else model.next_logits(rows(ids), cond)


def _cached_step(model: ARSIT, cache: KVCache, cuda_graph: bool, compile_step: bool):
    """``step(last_B1, pos) → logits (B, V)``: ``model.decode_step`` on static input tensors,
    replayed from a CUDA graph if ``cuda_graph`` (PyTorch's "whole network capture" recipe: warm-up on
    a side stream, capture, then copy the inputs in and replay). At AR-SIT's sizes one token's step
    is a few hundred small kernels, so the GPU waits on Python launching them (RESULTS, "AR-SIT
    sampling with a static KV cache", section "GPU session 2"); a graph launches them all at once.

    Built only when at least two tokens remain (the first comes from the prefill), so the cache has
    a position 1. The graph is captured before the prefill. Warm-up and capture run the step at
    position 1 and so write keys there, but every position's keys are written again by the call
    that brings that position before any query can read them (a query at p reads keys ≤ p).
    """
    fn = torch.compile(model.decode_step, fullgraph=True, dynamic=False) if compile_step else model.decode_step
    device = cache.k_LBhMd.device
    last_B1 = torch.zeros(cache.k_LBhMd.shape[1], 1, dtype=torch.long, device=device)
    pos_1 = torch.ones(1, dtype=torch.long, device=device)
    if cuda_graph:
        with torch.cuda.device(device):  # the graph records the current device's stream: make it the cache's
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # cuBLAS handles, autotuning, compiled code: made here, not in the capture
                    fn(last_B1, pos_1, cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits_BV = fn(last_B1, pos_1, cache)

    def step(last: torch.Tensor, pos: int) -> torch.Tensor:
        last_B1.copy_(last)
        pos_1.fill_(pos)
        if cuda_graph:
            with torch.cuda.device(device):
                graph.replay()
            out = logits_BV
        else:
            out = fn(last_B1, pos_1, cache)
        cache.length = pos + 1
        return out

    return step
