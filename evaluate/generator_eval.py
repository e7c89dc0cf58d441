"""Generation evaluation: the report every generator method returns, the shared row helper
(class-balanced samples, throughput, FID/KID), and AR-SIT's SIT Table 2 (coarse-to-fine generation)
and Table 4 (upsampling) in miniature.

Per stop scale s = 1…S: ``eval_samples`` class-balanced generations (labels 0, 1, …, C-1, 0, …)
stopped after scale s and decoded by the scale-causal decoder at its resolution R/2^(S-s); FID/KID
against the real ``images`` dataset block-averaged to that resolution; images/s of sampling plus
decoding (KV-cached, batch ``evaluate.batch_size``); the KV cache per image (exact bytes: 2 ·
layers · positions · dim per sequence, doubled under CFG) and, on CUDA, the measured peak memory
per image (the seed's Gb/image; NaN on CPU, where torch has no allocator statistics).

Upsampling: held-out images block-averaged by 2^k (k ≥ 1) are encoded into their first S-k scales
and AR-SIT generates the rest conditioned on their label; PSNR and FID against the originals, with
bicubic upsampling's PSNR beside it for scale.

By capability: without a scale-causal decoder (the ViT-VQGAN baseline, dense SIT, SIT-SCE) the rows
are the seed's baseline treatment (§5.3, Table 2): full-resolution samples, block-averaged to each
lower resolution; without a scale-causal encoder the upsampling rows are not applicable. What is not
applicable is reported (``not_applicable``), never raised, so no computed row is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from coarse2fine.evaluate.config import EvaluateConfig
from coarse2fine.evaluate.fid import Evaluator
from coarse2fine.evaluate.metrics import reconstruction_metrics
from coarse2fine.evaluate.tokenizer_eval import held_out
from coarse2fine.train.generate import forward_passes, generate, upsample
from coarse2fine.train.methods.base import SampleSettings


@dataclass
class GeneratorReport:
    """Rows of one sampling setting each (``key``: ``stop_scale`` for AR-SIT, ``steps`` for MaskGIT),
    logged as ``eval/{metric}_{prefix}{row[key]}``, the table ``eval/{table}.json`` and a grid with
    one row of samples per setting; AR-SIT adds upsampling rows."""

    rows: list[dict]
    key: str
    prefix: str
    table: str
    samples_grid: np.ndarray  # (settings·n, 3, R, R)
    upsampling: list[dict] = field(default_factory=list)  # one row per input resolution
    upsampling_grid: np.ndarray | None = None  # (3·n, 3, R, R): low-res input (nearest), upsampled, original
    not_applicable: dict[str, str] = field(default_factory=dict)  # table → why it has no rows


@dataclass
class SampledRow:
    images: torch.Tensor  # (n, 3, r, r) on the CPU
    metrics: dict[str, float]  # n, images_per_s, peak_mib_per_image (+ fid, kid, n_real)


def sample_row(sample_fn, classes: torch.Tensor, cfg: EvaluateConfig, ev: Evaluator | None, images_uri: str,
               factor: int = 1, desc: str = "generated") -> SampledRow:
    """Generate for ``classes`` in batches with ``sample_fn(classes_b, i) -> images``, timing only
    the sampling (plus decoding); FID/KID against the real images block-averaged by ``factor``."""
    device = classes.device
    images, seconds, peak = [], 0.0, float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, c in enumerate(torch.split(classes, cfg.batch_size)):
        t = time.perf_counter()
        x = sample_fn(c, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t
        images.append(x.float().cpu())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / min(cfg.batch_size, len(classes)) / 2**20
    fake = torch.cat(images)  # (n, 3, r, r)
    metrics = {"n": len(fake), "images_per_s": len(fake) / seconds, "peak_mib_per_image": peak}
    return SampledRow(fake, metrics | (fid_metrics(ev, images_uri, fake, factor, cfg.batch_size, desc) if ev else {}))


def fid_metrics(ev: Evaluator, images_uri: str, fake: torch.Tensor, factor: int, batch_size: int, desc: str) -> dict:
    """FID/KID of ``fake`` against the real images block-averaged by ``factor``."""
    res = ev.compare_features(ev.reference_features(images_uri, factor=factor),
                              ev.features(torch.split(fake, batch_size), desc=desc))
    return {"fid": res.fid, "kid": res.kid_mean, "n_real": res.n_real}


def balanced_classes(n: int, num_classes: int, device) -> torch.Tensor:
    """0, 1, …, C-1, 0, 1, … (the null class when the model is unconditional)."""
    return torch.arange(n, device=device) % num_classes if num_classes else torch.zeros(n, dtype=torch.long, device=device)


def kv_cache_bytes(generator, num_tokens: int, guided: bool) -> int:
    """Bytes of keys and values held per image when ``num_tokens`` tokens are sampled."""
    depth, dim = len(generator.blocks), generator.pos.shape[1]
    positions = num_tokens  # the condition plus every token but the last one is fed
    return 2 * depth * positions * dim * generator.pos.element_size() * (2 if guided else 1)


def _full_res(x_B3rr: torch.Tensor, R: int) -> torch.Tensor:
    return F.interpolate(x_B3rr, size=(R, R), mode="nearest") if x_B3rr.shape[-1] != R else x_B3rr


NEEDS_DECODER = "needs a scale-causal decoder (tokenizer.sit.causal_decoder: true)"
NEEDS_ENCODER = "needs a scale-causal encoder (tokenizer.sit.causal_encoder: true)"


def evaluate_generator(gen: torch.nn.Module, tok: torch.nn.Module, images_uri: str, cfg: EvaluateConfig,
                       settings: SampleSettings, num_samples: int, seed: int = 0, with_fid: bool = True,
                       stop_scales: bool = True, upsampling: bool = True,
                       baseline_resolutions: list[int] = ()) -> GeneratorReport:
    """Rows for every stop scale (with ``stop_scales``: the tokenizer decodes partial sequences),
    else for each of ``baseline_resolutions`` from full-resolution samples block-averaged (the
    seed's baseline rows); with ``upsampling``, rows per input resolution; for an AR-SIT generator
    and its tokenizer (loaded on the evaluation device)."""
    device = next(gen.parameters()).device
    S, R = gen.cfg.num_scales, tok.cfg.resolution
    ev = Evaluator(cfg) if with_fid else None
    classes = balanced_classes(num_samples, gen.cfg.num_classes, device)
    rows, grid_rows, na = [], [], {}
    generate(gen, tok, classes[:1], S, settings, seed)  # warm-up: one-off initialisation is not throughput
    tokens = S * gen.cfg.tokens_per_scale
    kv = {"kv_cache_kib_per_image": kv_cache_bytes(gen, tokens, settings.guidance != 1) / 1024}
    if stop_scales:
        for s in range(1, S + 1):
            factor = 2 ** (S - s)
            out = sample_row(lambda c, i: generate(gen, tok, c, s, settings, seed + i)[1], classes, cfg, ev,
                             images_uri, factor, f"generated {R // factor}px")
            t = s * gen.cfg.tokens_per_scale
            rows.append({"stop_scale": s, "resolution": R // factor, "tokens": t, "forward_passes": forward_passes(t)}
                        | out.metrics | {"kv_cache_kib_per_image": kv_cache_bytes(gen, t, settings.guidance != 1) / 1024})
            grid_rows.append(_full_res(out.images[:8], R))
    else:
        na["stop_scales"] = f"stopping early {NEEDS_DECODER}: full-resolution samples block-averaged instead"
        full = sample_row(lambda c, i: generate(gen, tok, c, S, settings, seed + i)[1], classes, cfg, None, images_uri)
        for r in sorted(set(baseline_resolutions) | {R}):
            factor = R // r
            fake = F.avg_pool2d(full.images, factor) if factor > 1 else full.images  # (n, 3, r, r)
            fid = fid_metrics(ev, images_uri, fake, factor, cfg.batch_size, f"downsampled {r}px") if ev else {}
            rows.append({"stop_scale": S, "resolution": r, "tokens": tokens, "forward_passes": forward_passes(tokens),
                         "downsampled_from": R} | full.metrics | fid | kv)  # images/s: generating at full resolution
            grid_rows.append(_full_res(fake[:8], R))
    if not upsampling:
        na["upsampling"] = f"upsampling {NEEDS_ENCODER}"
    up_rows, up_grid = [], None
    x, labels, _ = held_out(images_uri, num_samples)
    null = gen.cfg.null_class
    cond = torch.tensor([null if lab is None else lab for lab in labels], device=device)
    for k in range(1, S) if upsampling else []:
        low = F.avg_pool2d(x, 2 ** k)  # (n, 3, R/2^k, R/2^k)
        out = torch.cat([upsample(gen, tok, lb.to(device), cb, settings, seed + i)[1].float().cpu()
                         for i, (lb, cb) in enumerate(zip(torch.split(low, cfg.batch_size),
                                                          torch.split(cond, cfg.batch_size)))])
        bicubic = F.interpolate(low, size=(R, R), mode="bicubic", align_corners=False).clamp(0, 1)
        row = {"input_resolution": R >> k, "n": len(x), "psnr": float(reconstruction_metrics(out, x)["psnr"].mean()),
               "bicubic_psnr": float(reconstruction_metrics(bicubic, x)["psnr"].mean())}
        if ev is not None and len(x) >= 2:
            row["fid"] = ev.compare_features(ev.features(torch.split(x, cfg.batch_size)),
                                             ev.features(torch.split(out, cfg.batch_size))).fid
        up_rows.append(row)
        if k == S - 1:  # the hardest case, like the seed's Fig. 4 / 7
            n = min(8, len(x))
            up_grid = torch.cat([_full_res(low[:n], R), out[:n], x[:n]]).numpy()
    if stop_scales:
        return GeneratorReport(rows, "stop_scale", "stop", "stop_scales", torch.cat(grid_rows).numpy(), up_rows,
                               up_grid, na)
    return GeneratorReport(rows, "resolution", "down", "downsampled", torch.cat(grid_rows).numpy(), up_rows, up_grid, na)
