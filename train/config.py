"""Config sections of tokenizer and generator training (validated on construction; YAML is read elsewhere)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from coarse2fine.preprocess.config import Section
from coarse2fine.train.models.arsit import GENERATOR_SIZES
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


class OptimConfig(Section):
    """Optimisation and Ray Train settings shared by every trained model (AdamW, linear warm-up over
    ``warmup_frac`` of the steps, then ``schedule``: cosine to 0, or exponential decay to
    ``final_lr_frac`` · lr at the last step)."""

    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "exponential"] = "cosine"
    final_lr_frac: float = Field(0.01, gt=0, le=1, description="exponential schedule: lr multiplier at the last step")
    clip_norm: float = Field(1.0, gt=0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="CPU threads of each Ray Train worker's torch; None = the CPUs Ray reserved for it "
                                "(1 per worker: Ray sets OMP_NUM_THREADS). 2 on a 2-core machine with one worker")
    use_gpu: bool = False
    bf16: bool = Field(True, description="bf16 autocast when on GPU")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1, description="sample grid to MLflow every K steps")
    seed: int = 0


class TrainConfig(OptimConfig):
    """Tokenizer training (seed B.1: AdamW, warm-up over 10% then cosine, weight decay 1e-4), plus
    the adversarial loss."""

    adversarial_weight: float = Field(0.1, ge=0, description="seed B.1: 0.1; 0 turns the discriminator off")
    adversarial_start: float = Field(0.5, ge=0, le=1, description="fraction of max_steps before it starts (VQGAN disc_start)")


class GeneratorTrainConfig(OptimConfig):
    """AR-SIT training (seed B.2): lr rising linearly to 4.5e-4 over the first 10% of the steps, then
    exponential decay (the seed gives no rate: ``final_lr_frac``), softmax cross-entropy only."""

    lr: float = Field(4.5e-4, gt=0)
    schedule: Literal["cosine", "exponential"] = "exponential"


class GeneratorConfig(Section):
    """The generator trained on a tokenizer's ``tokens`` dataset, and its default sampling settings.

    ``method``: ``ar_sit`` (coarse-to-fine AR over SIT tokens). ``size``: see
    ``train/models/arsit.py`` (``parti-350m`` = seed B.2). ``eval_samples``: generated images per
    stop scale for the FID table (SIT Table 2 analog).
    """

    method: Literal["ar_sit"] = "ar_sit"
    size: str = "tiny"
    cond_drop_prob: float = Field(0.1, ge=0, lt=1, description="null-class rate in training (CFG; Parti/LlamaGen)")
    train: GeneratorTrainConfig = Field(default_factory=GeneratorTrainConfig)
    guidance: float = Field(2.0, ge=0, description="CFG scale used by generate/evaluate; 1 = off")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    eval_samples: int = Field(64, ge=2)

    @field_validator("size")
    @classmethod
    def _known_size(cls, v: str) -> str:
        if v not in GENERATOR_SIZES:
            raise ValueError(f"unknown generator size {v!r}; choose from {sorted(GENERATOR_SIZES)}")
        return v


class RayConfig(Section):
    """``address``: None starts a local Ray; ``auto`` or ``ray://host:10001`` joins a cluster."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only")


