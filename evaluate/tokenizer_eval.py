"""Multi-resolution reconstruction evaluation of a trained tokenizer (SIT seed, Table 1 in miniature).

For each resolution the tokenizer method lists (R, R/2, … for SIT), its ``reconstruct`` encodes and
decodes the held-out images block-averaged to that resolution (natively, or through R: see the
method). Works for any registered tokenizer method. Reported per resolution: PSNR, SSIM (when the side is at least the 11-px SSIM
window), L1, rFID (Inception features of originals vs reconstructions, n stated), encode+decode
images/s and tokens per image; at full resolution also codebook usage and unique-token ratio per token group (SIT: per scale).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from coarse2fine.evaluate.config import EvaluateConfig
from coarse2fine.evaluate.fid import Evaluator, resolve_device
from coarse2fine.evaluate.metrics import codebook_usage, reconstruction_metrics, unique_token_ratio
from coarse2fine.preprocess import schema
from coarse2fine.train.checkpoints import load_model
from coarse2fine.train.data import load_bases
from coarse2fine.train.methods.base import usage_groups
from coarse2fine.train.steps import group_ids

SSIM_WINDOW = 11  # Gaussian window of the SSIM (σ = 1.5), torchmetrics' default


@dataclass
class TokenizerReport:
    rows: list[dict]  # one per resolution, full resolution first
    codebook: dict[str, float]  # usage / unique ratio per scale
    summary: dict[str, float]  # tokens_per_image, num_params (+ bits_per_image, codebook_usage, unique_ratio if discrete)
    grid: np.ndarray  # (2·n, 3, R, R): originals then reconstructions


def held_out(images_uri: str, limit: int) -> tuple[torch.Tensor, list[int | None], list[str]]:
    """Images, labels and keys of the validation split (the train split when there is no
    validation row), sorted by key."""
    t = schema.read_table(images_uri, ["key", "split", "label", "image"]).sort_by("key")
    splits = t.column("split").to_pylist()
    pick = "validation" if "validation" in splits else "train"
    rows = [i for i, s in enumerate(splits) if s == pick][:limit]
    imgs, labels, keys = (t.column(c).to_pylist() for c in ("image", "label", "key"))
    x = torch.from_numpy(np.stack([schema.decode_image(imgs[i]) for i in rows]))
    return x, [labels[i] for i in rows], [keys[i] for i in rows]


def dataset_codebook_stats(tokens_uri: str) -> dict[str, float]:
    """Codebook usage and unique-token ratio per token group over a whole ``tokens`` dataset (every
    split): the held-out images alone hold too few tokens to use a large codebook fully. Keys
    ``dataset/codebook_usage/{group}``, ``dataset/unique_ratio/{group}``, their means, and
    ``dataset/images``; empty for continuous tokens."""
    layout = schema.layout_from_manifest(schema.read_manifest(tokens_uri), tokens_uri)
    ids = [c for c in layout if c.vocab]
    if not ids:
        return {}
    table = schema.read_table(tokens_uri, [c.name for c in ids])
    stats: dict[str, float] = {"dataset/images": table.num_rows}
    for (name, vocab, _), col in zip(usage_groups(layout), ids):
        a = schema.tensor_numpy(table.column(col.name)).reshape(table.num_rows, -1)  # (images, tokens)
        stats[f"dataset/codebook_usage/{name}"] = codebook_usage(a, vocab)
        stats[f"dataset/unique_ratio/{name}"] = unique_token_ratio(a)
    for key in ("codebook_usage", "unique_ratio"):
        stats[f"dataset/{key}"] = float(np.mean([v for k, v in stats.items() if k.startswith(f"dataset/{key}/")]))
    return stats


def evaluate_checkpoint(checkpoint_uri: str, images_uri: str, cfg: EvaluateConfig,
                        resolutions: list[int] | None = None, with_fid: bool = True,
                        decomposition_uri: str | None = None) -> TokenizerReport:
    """The report of a tokenizer checkpoint on held-out images (with their Mumford–Shah bases from
    ``decomposition_uri`` when the method takes them)."""
    device = resolve_device(cfg.device)
    method, model = load_model(checkpoint_uri, device, "tokenizer")
    x, _, keys = held_out(images_uri, cfg.max_samples)
    k = method.factors(model.cfg)
    bases = load_bases(decomposition_uri, keys, k) if k else None
    R = model.cfg.resolution
    assert x.shape[-1] == R, f"images are {x.shape[-1]}px, the tokenizer was trained at {R}px"
    ev = Evaluator(cfg) if with_fid else None
    rows, full_idx, full_recon = [], None, None
    for r in resolutions or method.eval_resolutions(model.cfg):
        xr = F.avg_pool2d(x, R // r) if r != R else x  # (N, 3, r, r) block averages
        recon, idx = [], []
        t = time.perf_counter()
        for i, b in enumerate(torch.split(xr, cfg.batch_size)):
            bb = None if bases is None else bases[i * cfg.batch_size: (i + 1) * cfg.batch_size].to(device)
            rb, ib = method.reconstruct(model, b.to(device), bb)
            recon.append(rb.cpu())
            idx.append(ib.cpu())
        seconds = time.perf_counter() - t
        recon_t, idx_t = torch.cat(recon), torch.cat(idx)
        m = reconstruction_metrics(recon_t, xr)
        row = {"resolution": r, "n": len(xr), "psnr": float(m["psnr"].mean()),
               "ssim": float(m["ssim"].mean()) if r >= SSIM_WINDOW else float("nan"),
               "l1": float(m["l1"].mean()), "images_per_s": len(xr) / seconds,
               "tokens": int(idx_t[0].numel())}
        if ev is not None and len(xr) >= 2:
            row["rfid"] = ev.compare_features(ev.features(torch.split(xr, cfg.batch_size)),
                                              ev.features(torch.split(recon_t, cfg.batch_size))).fid
        rows.append(row)
        if r == R:
            full_idx, full_recon = idx_t, recon_t
    codebook = {}
    groups = usage_groups(method.layout(model.cfg))
    for ids_Nn, (name, vocab, _) in zip(group_ids(full_idx, groups), groups):
        codebook[f"codebook_usage/{name}"] = codebook_usage(ids_Nn, vocab)
        codebook[f"unique_ratio/{name}"] = unique_token_ratio(ids_Nn)
    summary = {"tokens_per_image": rows[0]["tokens"], "num_params": sum(p.numel() for p in model.parameters())}
    if groups:  # discrete: log2 of each token's vocabulary, summed
        summary["bits_per_image"] = sum(size * math.log2(vocab) for _, vocab, size in groups)
        for key in ("codebook_usage", "unique_ratio"):
            summary[key] = float(np.mean([v for k, v in codebook.items() if k.startswith(key + "/")]))
    n = min(8, len(x))
    return TokenizerReport(rows, codebook, summary, torch.cat([x[:n], full_recon[:n]]).numpy())
