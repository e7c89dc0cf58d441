"""Metric math: FID, KID, IS on features/logits; PSNR, SSIM, L1; codebook usage and unique tokens.

FID (Heusel et al. 2017): ``‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½`` in float64; the trace
term uses the eigenvalues of the symmetric ``Σ₁^½ Σ₂ Σ₁^½`` (same value as ``sqrtm(Σ₁Σ₂)``, stable).
KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
``k(x, y) = (xᵀy / d + 1)³`` averaged over random subsets, as torch-fidelity / torchmetrics do.
IS (Salimans et al. 2016): ``exp E_x KL(p(y|x) ‖ p(y))`` over ``splits`` chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (what FID needs; cached per dataset)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int

    @classmethod
    def from_features(cls, f_ND: np.ndarray) -> "FeatureStats":
        f = np.asarray(f_ND, dtype=np.float64)
        assert f.ndim == 2 and f.shape[0] >= 2, f"need (N>=2, D) features, got {f.shape}"
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), f.shape[0])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians fitted to features (float64)."""
    s1_half = _psd_sqrt(a.sigma)
    m = s1_half @ b.sigma @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


def mmd2_poly(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² with the cubic polynomial kernel (one KID subset), x: (m, d), y: (n, d)."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    return (
        (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
        - 2 * k_xy.mean()
    )


def kernel_inception_distance(
    f_real: np.ndarray, f_fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of ``min(subset_size, n)`` per side
    (float64 on ``device``; subsets drawn by a seeded numpy generator, so results do not depend on it)."""
    x = torch.as_tensor(np.asarray(f_real), dtype=torch.float64, device=device)
    y = torch.as_tensor(np.asarray(f_fake), dtype=torch.float64, device=device)
    size = min(subset_size, x.shape[0], y.shape[0])
    assert size >= 2, "KID needs at least 2 samples per side"
    rng = np.random.default_rng(seed)
    vals = torch.stack([
        mmd2_poly(x[torch.as_tensor(rng.choice(x.shape[0], size, replace=False), device=device)],
                  y[torch.as_tensor(rng.choice(y.shape[0], size, replace=False), device=device)])
        for _ in range(subsets)
    ]).cpu().numpy()
    return float(np.mean(vals)), float(np.std(vals))


def inception_score(logits_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` chunks of the samples."""
    logits = torch.as_tensor(np.asarray(logits_NK), dtype=torch.float64)
    p = torch.softmax(logits, dim=1)  # (N, K)
    scores = []
    for chunk in torch.chunk(p, splits):
        py = chunk.mean(dim=0, keepdim=True)
        kl = (chunk * (torch.log(chunk + 1e-12) - torch.log(py + 1e-12))).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def reconstruction_metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB), SSIM (Gaussian window 11, σ=1.5) and L1 of images in [0, 1], (N,3,H,W)."""
    assert x.shape == y.shape and x.ndim == 4, (x.shape, y.shape)
    x, y = x.double().clamp(0, 1), y.double().clamp(0, 1)
    return {
        "psnr": peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(y, x, data_range=1.0, reduction="none"),
        "l1": (x - y).abs().mean(dim=(1, 2, 3)),
    }


def codebook_usage(indices: np.ndarray | torch.Tensor, codebook_size: int) -> float:
    """Fraction of the codebook's entries used at least once over the evaluation set."""
    idx = np.asarray(indices).ravel()
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < codebook_size), "index out of codebook range"
    return float(np.unique(idx).size / codebook_size)


def unique_token_ratio(indices_NL: np.ndarray | torch.Tensor) -> float:
    """Mean over images of (distinct tokens in the image) / (tokens per image) (CQ seed, Table 6b)."""
    idx = np.asarray(indices_NL).reshape(len(indices_NL), -1)
    return float(np.mean([np.unique(row).size / row.size for row in idx]))
