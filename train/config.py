"""Config sections of tokenizer training (validated on construction; YAML is read elsewhere)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from coarse2fine.preprocess.config import Section
from coarse2fine.train.models.sit import SITConfig


class TokenizerConfig(Section):
    """``method``: ``sit`` (spectral tokenizer) or ``vit_vq`` (spatial ViT-VQGAN baseline: one
    scale of ``vit_vq_tokens`` pixel patches; default ``num_scales * tokens_per_scale`` so both see
    the same sequence length, as in the seed's 1024 = 4 × 256 comparison; it must be a square)."""

    method: Literal["sit", "vit_vq"] = "sit"
    num_scales: int = Field(3, ge=1)
    tokens_per_scale: int = Field(16, ge=1)
    size: str = "tiny"
    dec_size: Optional[str] = None
    codebook_size: int = Field(1024, ge=2)
    code_dim: int = Field(32, ge=1)
    per_scale_codebooks: bool = True
    per_scale_params: bool = True
    causal_encoder: bool = True
    causal_decoder: bool = True
    beta: float = 0.25
    entropy_weight: float = 0.002
    vit_vq_tokens: Optional[int] = Field(None, ge=1)

    def model_config_for(self, resolution: int) -> SITConfig:
        """The model dataclass for images of ``resolution`` (raises ValueError on impossible shapes)."""
        common = dict(size=self.size, dec_size=self.dec_size, codebook_size=self.codebook_size,
                      code_dim=self.code_dim, beta=self.beta, entropy_weight=self.entropy_weight)
        if self.method == "vit_vq":
            return SITConfig(resolution=resolution, num_scales=1,
                             tokens_per_scale=self.vit_vq_tokens or self.num_scales * self.tokens_per_scale,
                             per_scale_codebooks=False, per_scale_params=False,
                             causal_encoder=False, causal_decoder=False, **common)
        return SITConfig(resolution=resolution, num_scales=self.num_scales, tokens_per_scale=self.tokens_per_scale,
                         per_scale_codebooks=self.per_scale_codebooks, per_scale_params=self.per_scale_params,
                         causal_encoder=self.causal_encoder, causal_decoder=self.causal_decoder, **common)


class TrainConfig(Section):
    """Optimisation (seed B.1: AdamW, warm-up over 10% then cosine, weight decay 1e-4) and Ray Train."""

    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    clip_norm: float = Field(1.0, gt=0)
    adversarial_weight: float = Field(0.1, ge=0, description="seed B.1: 0.1; 0 turns the discriminator off")
    adversarial_start: float = Field(0.5, ge=0, le=1, description="fraction of max_steps before it starts (VQGAN disc_start)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = False
    bf16: bool = Field(True, description="bf16 autocast when on GPU")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1, description="reconstruction grid to MLflow every K steps")
    seed: int = 0


class RayConfig(Section):
    """``address``: None starts a local Ray; ``auto`` or ``ray://host:10001`` joins a cluster."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only")


