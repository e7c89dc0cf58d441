"""ViT-VQGAN vector quantizer with factorised, l2-normalised codes, optionally one codebook per scale.

Contract (as lucidrains' vector-quantize-pytorch): ``forward(z) -> (quantized, indices, aux_loss)``
and ``indices_to_codes(indices)``. Inputs are grouped ``z_BGNC``: group g uses codebook g (SIT's
per-scale codebooks, seed §4.1) or all tokens share one codebook (``num_codebooks=1``, G=1).

* Factorised codes (ViT-VQGAN): a linear map C → ``code_dim`` (32), l2-normalised, looked up by
  cosine similarity in an l2-normalised codebook; the chosen code is mapped back code_dim → C.
* Straight-through estimator; codebook loss ``‖sg[z] − e‖²`` plus commitment ``β‖z − sg[e]‖²``
  with β = 0.25 (seed B.1).
* Entropy loss (seed §4.1, MaskGIT/MAGVIT-v2): with ``d = softmax(-‖z − e_j‖² / τ)`` over the
  codebook, minimise the mean per-token entropy and maximise the entropy of the average
  assignment per codebook (averaged over the batch and the tokens, as MaskGIT's implementation
  does); τ = 0.01 is MaskGIT's ``entropy_temperature``; weight 0.002 (seed B.1).

The codebook is an ordinary parameter updated by gradients (no k-means init or dead-code
re-initialisation), so DDP's gradient all-reduce keeps it identical on every worker.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from coarse2fine.train.kernels.nearest_code import nearest_code
from coarse2fine.train.models.blocks import GroupLinear


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


class FactorizedVQ(nn.Module):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int = 32,
        num_codebooks: int = 1,
        beta: float = 0.25,
        entropy_weight: float = 0.002,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature
        self.codebook = nn.Parameter(torch.randn(num_codebooks, codebook_size, code_dim))  # (G, K, d)
        self.proj_in = GroupLinear(num_codebooks, dim, code_dim)
        self.proj_out = GroupLinear(num_codebooks, code_dim, dim)

    def _codes(self, g: int) -> torch.Tensor:
        return F.normalize(self.codebook[:g], dim=-1)  # (G', K, d)

    def forward(self, z_BGNC: torch.Tensor, return_terms: bool = False):
        g = z_BGNC.shape[1]
        if self.num_codebooks == 1 and g > 1:  # shared codebook: fold the groups into the tokens
            B, G, N, C = z_BGNC.shape
            q, idx, aux, terms = self.forward(z_BGNC.reshape(B, 1, G * N, C), return_terms=True)
            out = (q.reshape(B, G, N, C), idx.reshape(B, G, N), aux)
            return out + (terms,) if return_terms else out
        assert g <= self.num_codebooks, f"{g} groups for {self.num_codebooks} codebooks"
        # the lookup, its losses and the straight-through sum in fp32 even under bf16 autocast: bf16
        # similarities change the chosen code of near ties (~2.6% of choices in a CPU check)
        with torch.autocast(z_BGNC.device.type, enabled=False):
            z = F.normalize(self.proj_in(z_BGNC).float(), dim=-1)  # (B, G', N, d)
            sim = torch.einsum("bgnd,gkd->bgnk", z, self._codes(g).float())  # cosine similarity (B, G', N, K)
            indices = sim.argmax(dim=-1)  # (B, G', N)
            e = self.indices_to_latents(indices).float()  # (B, G', N, d)
            codebook_loss = F.mse_loss(e, z.detach())
            commitment = F.mse_loss(z, e.detach())
            # ‖z − e‖² = 2 − 2 cos for unit vectors
            probs = torch.softmax(-(2 - 2 * sim) / self.entropy_temperature, dim=-1)  # (B, G', N, K)
            per_token = _entropy(probs).mean()
            avg = probs.mean(dim=(0, 2))  # (G', K)
            codebook_entropy = _entropy(avg).mean()
            entropy_loss = per_token - codebook_entropy
            aux = codebook_loss + self.beta * commitment + self.entropy_weight * entropy_loss
            z_q = z + (e - z).detach()  # straight-through
        quantized = self.proj_out(z_q)
        if return_terms:
            terms = {"codebook": codebook_loss.detach(), "commitment": commitment.detach(),
                     "token_entropy": per_token.detach(), "codebook_entropy": codebook_entropy.detach()}
            return quantized, indices, aux, terms
        return quantized, indices, aux

    def indices_to_latents(self, indices_BGN: torch.Tensor) -> torch.Tensor:
        """Unit code vectors (B, G', N, code_dim) of the given indices."""
        g = indices_BGN.shape[1]
        if self.num_codebooks == 1 and g > 1:
            B, G, N = indices_BGN.shape
            return self.indices_to_latents(indices_BGN.reshape(B, 1, G * N)).reshape(B, G, N, -1)
        codes = self._codes(g)  # (G', K, d)
        gather = torch.arange(g, device=indices_BGN.device)[None, :, None]  # (1, G', 1)
        return codes[gather, indices_BGN]  # (B, G', N, d)

    def indices_to_codes(self, indices_BGN: torch.Tensor) -> torch.Tensor:
        """Decoder inputs (B, G', N, C) of the given indices (what ``forward`` returns as quantized)."""
        lat = self.indices_to_latents(indices_BGN)
        if self.num_codebooks == 1 and lat.shape[1] > 1:
            B, G, N, d = lat.shape
            return self.proj_out(lat.reshape(B, 1, G * N, d)).reshape(B, G, N, -1)
        return self.proj_out(lat)


class EuclideanVQ(nn.Module):
    """Plain VQ-VAE quantizer over vectors ``z_BND``: nearest code by Euclidean distance (CQ seed
    eq. 2; VQ-VAE/VQGAN), straight-through estimator, codebook loss ``‖sg[z] − e‖²`` plus
    commitment ``β‖z − sg[e]‖²`` (eq. 3; β = 0.25 as VQ-VAE and taming-transformers — the seed does
    not give it). No l2 normalisation and no entropy term (the seed reports that entropy
    regularisation hurts CQ). Codebook initialised uniform in ±1/K as taming-transformers does.

    ``code_dim`` < ``dim`` adds linear maps dim → code_dim → dim around the lookup (a low-dimensional
    codebook, as the LlamaGen baseline of CQ's Table 6a; LlamaGen also l2-normalises, which this
    does not, so that only the dimension differs from the full-dimensional row).
    """

    def __init__(self, dim: int, codebook_size: int, code_dim: int | None = None, beta: float = 0.25) -> None:
        super().__init__()
        d = code_dim or dim
        self.codebook_size, self.beta = codebook_size, beta
        self.codebook = nn.Parameter(torch.empty(codebook_size, d).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.proj_in = nn.Linear(dim, d) if d != dim else nn.Identity()
        self.proj_out = nn.Linear(d, dim) if d != dim else nn.Identity()

    def nearest(self, z_BNd: torch.Tensor) -> torch.Tensor:
        """Indices (B, N) of the nearest codes: argmin_k ‖z − e_k‖² (eq. 2), in at least fp32 (bf16
        autocast would blur near ties); fused on GPU (``kernels/nearest_code.py``)."""
        B, N, d = z_BNd.shape
        with torch.autocast(z_BNd.device.type, enabled=False):
            idx = nearest_code(z_BNd.detach().reshape(B * N, d), self.codebook.detach(), "euclidean")
        return idx.reshape(B, N)

    def forward(self, z_BND: torch.Tensor):
        """(quantized (B, N, D), indices (B, N), aux_loss) — the quantizer contract."""
        z = self.proj_in(z_BND)  # (B, N, d)
        indices = self.nearest(z)
        e = self.codebook[indices]  # (B, N, d)
        aux = F.mse_loss(e, z.detach()) + self.beta * F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()  # straight-through
        return self.proj_out(z_q), indices, aux

    def indices_to_codes(self, indices_BN: torch.Tensor) -> torch.Tensor:
        """Decoder inputs (B, N, D) of the given indices (what ``forward`` returns as quantized)."""
        return self.proj_out(self.codebook[indices_BN])
