"""FID / KID / IS between image sets, with cached reference statistics and a logged protocol."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from coarse2fine.evaluate import image_sets
from coarse2fine.evaluate.config import EvaluateConfig
from coarse2fine.evaluate.inception import InceptionClassifier, InceptionFeatureExtractor
from coarse2fine.evaluate.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from coarse2fine.preprocess import schema
from coarse2fine.preprocess.errors import UserValueError

log = logging.getLogger(__name__)
STATS_DIR = "_fid_stats"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device) -> str:
    """What a throughput was measured on, e.g. ``cpu x86_64, 2 cores`` or ``NVIDIA H100 80GB HBM3``."""
    import os
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} {platform.machine()}, {os.cpu_count()} cores"


@torch.no_grad()
def extract(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device, desc: str = "features") -> np.ndarray:
    """Run ``model`` over batches (with a progress bar) and return stacked outputs as float64."""
    model = model.to(device)
    out = [model(b.to(device)).double().cpu() for b in tqdm(batches, desc=desc, unit="batch", leave=False)]
    if not out:
        raise UserValueError("no images to evaluate")
    return torch.cat(out).numpy()


@dataclass
class FIDResult:
    """FID/KID (and IS when possible) with the protocol that produced them."""

    fid: float
    kid_mean: float
    kid_std: float
    n_real: int
    n_fake: int
    inception_score: float | None = None
    inception_score_std: float | None = None
    is_skipped_reason: str | None = None
    protocol: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        m = {"fid": self.fid, "kid_mean": self.kid_mean, "kid_std": self.kid_std}
        if self.inception_score is not None:
            m |= {"is_mean": self.inception_score, "is_std": self.inception_score_std}
        return m


class Evaluator:
    """Holds the feature network for one protocol (weights, resize, sample count, KID subsets)."""

    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.extractor = InceptionFeatureExtractor(cfg.fid_weights)

    def protocol(self) -> dict:
        return {
            "feature_net": self.extractor.weights,
            "feature_net_sha1": self.extractor.sha1,
            "feature_dim": InceptionFeatureExtractor.num_features,
            "resize": "bilinear 299x299, no antialias",
            "input_scaling": "(x*255-128)/128",
            "max_samples": self.cfg.max_samples,
            "kid_subsets": self.cfg.kid_subsets,
            "kid_subset_size": self.cfg.kid_subset_size,
            "kid_kernel": "(x.y/d+1)^3",
            "seed": self.cfg.seed,
        }

    def features(self, source: str | Iterable[torch.Tensor], split: str | None = None, desc: str = "features",
                 factor: int = 1) -> np.ndarray:
        """Features of an image set (a URI, or batches); ``factor`` > 1 block-averages the images
        by it first (the real data at a coarser resolution)."""
        batches = (image_sets.iter_batches(source, self.cfg.batch_size, self.cfg.max_samples, split)
                   if isinstance(source, str) else source)
        if factor > 1:
            batches = (F.avg_pool2d(b, factor) for b in batches)
        return extract(self.extractor, batches, self.device, desc)

    def reference_features(self, uri: str, split: str | None = None, factor: int = 1) -> np.ndarray:
        """Features of a reference set (block-averaged by ``factor``); for a complete dataset they
        are cached next to it (``{dataset}/_fid_stats/…``, keyed by the dataset fingerprint and the
        protocol)."""
        desc = "reference" if factor == 1 else f"reference at 1/{factor} resolution"
        fp = image_sets.dataset_fingerprint(uri)
        if fp is None:
            return self.features(uri, split, desc, factor)
        proto = f"{fp}-{split or 'all'}-{self.cfg.max_samples}-{factor}x-{self.extractor.sha1[:12]}"
        fs, path = schema.url_to_fs(schema.join(uri, STATS_DIR, f"{proto}.npy"))
        if fs.exists(path):
            log.info("reference features: reusing %s", path)
            with fs.open(path, "rb") as f:
                return np.load(f).astype(np.float64)
        feats = self.features(uri, split, desc, factor)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            np.save(f, feats.astype(np.float32))
        return feats

    def compare_features(self, f_real: np.ndarray, f_fake: np.ndarray) -> FIDResult:
        fid = frechet_distance(FeatureStats.from_features(f_real), FeatureStats.from_features(f_fake))
        kid_m, kid_s = kernel_inception_distance(f_real, f_fake, self.cfg.kid_subsets, self.cfg.kid_subset_size,
                                                 self.cfg.seed, self.device)
        return FIDResult(fid, kid_m, kid_s, len(f_real), len(f_fake), protocol=self.protocol())

    def inception_score(self, batches: Iterable[torch.Tensor], result: FIDResult) -> FIDResult:
        """Fill IS into ``result`` if a classifier file is configured; otherwise record why not."""
        if not self.cfg.inception_weights:
            result.is_skipped_reason = (
                "IS skipped: no Inception classifier configured (evaluate.inception_weights); the offline "
                "FID network has pool features only, no logits head"
            )
            log.warning(result.is_skipped_reason)
            return result
        logits = extract(InceptionClassifier(self.cfg.inception_weights), batches, self.device, "IS logits")
        result.inception_score, result.inception_score_std = inception_score(logits, self.cfg.is_splits)
        result.protocol["is_classifier"] = self.cfg.inception_weights
        result.protocol["is_splits"] = self.cfg.is_splits
        return result

