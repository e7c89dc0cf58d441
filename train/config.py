"""Config sections of tokenizer and generator training (validated on construction; YAML is read elsewhere)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, create_model, field_validator, model_validator

from coarse2fine.preprocess.config import Section
from coarse2fine.train import methods


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
    device: Literal["auto", "xla"] = Field(
        "auto", description="auto = Ray Train's device (CUDA with use_gpu, else CPU); xla = torch_xla's device "
                            "(experimental: TPU, or XLA:CPU with PJRT_DEVICE=CPU; one worker; `make xla-env`)")
    bf16: bool = Field(True, description="bf16 autocast when on GPU")
    kernels: Literal["auto", "reference"] = Field(
        "auto", description="auto = Triton kernels on CUDA where they exist (train/kernels/); reference = torch everywhere")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1, description="sample grid to MLflow every K steps")
    seed: int = 0


    @model_validator(mode="after")
    def _xla_runs_alone(self) -> "OptimConfig":
        """The XLA path runs one worker on torch_xla's device: Ray Train's XLA process group and
        GPU placement are not wired to it."""
        if self.device == "xla" and (self.num_workers > 1 or self.use_gpu):
            raise ValueError("train.device: xla runs one worker without use_gpu (num_workers: 1, use_gpu: false)")
        return self


class TrainConfig(OptimConfig):
    """Tokenizer training (seed B.1: AdamW, warm-up over 10% then cosine, weight decay 1e-4), plus
    the perceptual and adversarial losses (``train/losses.py``)."""

    perceptual: Literal["auto", "lpips", "inception", "ms_ssim", "off"] = Field(
        "auto", description="auto = LPIPS-VGG when its VGG16 weights are found (lpips_backbone, else torch hub's "
                            "cache), else the LPIPS-style distance on the FID Inception's stem; ms_ssim = 1 - MS-SSIM")
    perceptual_weight: float = Field(0.1, ge=0, description="seed B.1: 0.1")
    lpips_backbone: Optional[str] = Field(
        None, description="URI of torchvision's VGG16 ImageNet state dict (vgg16-397923af.pth) for LPIPS")
    adversarial_weight: float = Field(0.1, ge=0, description="seed B.1: 0.1; 0 turns the discriminator off")
    adversarial_start: float = Field(0.5, ge=0, le=1, description="fraction of max_steps before it starts (VQGAN disc_start)")
    adaptive_weight: bool = Field(True, description="scale the adversarial loss by VQGAN's adaptive weight")
    disc_lr: Optional[float] = Field(None, gt=0, description="the discriminator's learning rate; None = lr")
    disc_channels: int = Field(64, ge=8, description="channels of the patch discriminator's first layer (VQGAN's "
                               "NLayerDiscriminator ndf: 64; each further layer doubles them, up to 8x)")
    disc_layers: int = Field(3, ge=1, description="its stride-2 convolutions (VQGAN's n_layers: 3)")
    lecam_weight: float = Field(0.0, ge=0, description="LeCam regularisation of the discriminator (CQ seed §3.2 uses "
                                "it; 0.001 as MAGVIT-v2, the seed gives no weight); 0 = off (SIT has none)")


class GeneratorTrainConfig(OptimConfig):
    """Generator training; defaults are AR-SIT's (seed B.2): lr rising linearly to 4.5e-4 over the first 10% of the steps, then
    exponential decay (the seed gives no rate: ``final_lr_frac``), softmax cross-entropy only."""

    lr: float = Field(4.5e-4, gt=0)
    schedule: Literal["cosine", "exponential"] = "exponential"


RUN_ONLY_KEYS = {"log_every", "sample_every", "checkpoint_every", "torch_threads", "kernels"}
"""Training settings that change how a run is executed or logged, not what it computes: not fingerprinted."""


class _ModelSection(Section):
    """``method`` (a registry name), its training section and one parameter section per
    registered method (``<kind>.<method>``); only the active method's section is fingerprinted."""

    kind: ClassVar[str]
    method: str

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        methods.get(cls.kind, v)  # raises with the registered names
        return v

    def method_plugin(self) -> methods.TokenizerMethod | methods.GeneratorMethod:
        return methods.get(self.kind, self.method)

    def params(self) -> Section:
        """The active method's parameter section."""
        return getattr(self, self.method)

    def spec(self) -> dict:
        """What determines the trained model besides its data and code: method, its parameters, training."""
        return {"method": self.method, "params": self.params().model_dump(),
                "train": self.train.model_dump(exclude=RUN_ONLY_KEYS)}


class _TokenizerBase(_ModelSection):
    kind = "tokenizer"
    method: str = "sit"
    train: TrainConfig = Field(default_factory=TrainConfig)

    def model_config_for(self, resolution: int):
        """The active method's model dataclass for images of ``resolution`` (ValueError on impossible shapes)."""
        return self.method_plugin().model_config(self.params(), resolution)


class _GeneratorBase(_ModelSection):
    """The generator trained on a tokenizer's ``tokens`` dataset, and its default sampling settings
    (``eval_samples``: generated images per evaluation row, e.g. per stop scale for SIT Table 2)."""

    kind = "generator"
    method: str = "ar_sit"
    train: GeneratorTrainConfig = Field(default_factory=GeneratorTrainConfig)
    guidance: float = Field(2.0, ge=0, description="CFG scale used by generate/evaluate; 1 = off")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    steps: Optional[int] = Field(None, ge=1, description="parallel decoding steps (maskgit); None = its default")
    eval_samples: int = Field(64, ge=2)


def _with_method_sections(base: type[_ModelSection], registry: dict, doc: str) -> type[_ModelSection]:
    sections = {name: (m.params, Field(default_factory=m.params)) for name, m in registry.items()}
    return create_model(base.__name__.lstrip("_").replace("Base", "Config"), __base__=base, __doc__=doc, **sections)


TokenizerConfig = _with_method_sections(
    _TokenizerBase, methods.TOKENIZERS,
    "The tokenizer: ``method`` (" + ", ".join(methods.TOKENIZERS) + "), ``train`` and a section per method.")
GeneratorConfig = _with_method_sections(
    _GeneratorBase, methods.GENERATORS,
    "The generator: ``method`` (" + ", ".join(methods.GENERATORS) + "), ``train``, sampling settings and a "
    "section per method.")


class RayConfig(Section):
    """``address``: None starts a local Ray; ``auto`` or ``ray://host:10001`` joins a cluster."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only")


