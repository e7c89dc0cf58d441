"""Tokenizer losses.

Weights follow the seed (B.1): 1.0 L2, 0.1 perceptual and 0.1 adversarial; the quantizer's
commitment (0.25) and entropy (0.002) terms live in its aux loss.

Perceptual term (``train/models/perceptual.py``): LPIPS-VGG when torchvision's VGG16 weights are at
the configured URI or in torch hub's cache; otherwise (``auto``) the LPIPS-style distance on the
FID Inception's stem; or MS-SSIM (pretrained-free). Every run records which one (tag ``c2f.perceptual``).

Adversarial loss: hinge loss (VQGAN) on a spectral-normalised patch discriminator, switched on after
``adversarial_start`` steps as VQGAN does (``disc_start``) so the autoencoder first learns to
reconstruct, and scaled by VQGAN's adaptive weight (:func:`adaptive_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from coarse2fine.preprocess.errors import UserValueError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights (IMAGENET1K_V1), LPIPS's backbone
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4  # VQGAN's calculate_adaptive_weight


@dataclass(frozen=True)
class LossWeights:
    l2: float = 1.0
    perceptual: float = 0.1
    adversarial: float = 0.1
    adversarial_start: int = 0
    adaptive: bool = True  # VQGAN's adaptive adversarial weight
    lecam: float = 0.0  # LeCam regularisation of the discriminator (CQ seed §3.2); 0 = off


@dataclass(frozen=True)
class PerceptualChoice:
    """The perceptual loss a run trains with: ``kind`` lpips | inception | ms_ssim | off."""

    kind: str
    backbone_uri: str | None = None

    def describe(self) -> str:
        return {"lpips": f"LPIPS-VGG (backbone {self.backbone_uri})",
                "inception": "LPIPS-style distance on the FID Inception stem (conv_2, conv_4); no VGG weights offline",
                "ms_ssim": "1 - MS-SSIM (pretrained-free)", "off": "off"}[self.kind]


def resolve_perceptual(kind: str, weight: float, backbone_uri: str | None, hub_dir: str | None = None
                       ) -> PerceptualChoice:
    """``auto`` → LPIPS when the VGG16 weights exist at ``backbone_uri`` (or, without one, in torch
    hub's ``hub_dir/checkpoints``), else the Inception-stem distance; ``lpips`` without weights is
    an error; the other kinds are taken as they are; any kind at weight 0 is off."""
    import fsspec

    if weight == 0:
        return PerceptualChoice("off")
    if kind not in ("auto", "lpips"):  # no backbone to look for (a gs:// URI would cost a round trip)
        return PerceptualChoice(kind)
    uri = backbone_uri or (str(Path(hub_dir) / "checkpoints" / VGG16_FILE) if hub_dir else None)
    found = uri is not None and fsspec.core.url_to_fs(uri)[0].exists(uri)
    if kind == "lpips" and not found:
        raise UserValueError(f"LPIPS needs torchvision's VGG16 weights ({VGG16_FILE}); not found at {uri}: "
                             "set tokenizer.train.lpips_backbone or choose perceptual: inception | ms_ssim | off")
    if kind == "auto":
        kind = "lpips" if found else "inception"
    return PerceptualChoice(kind, uri if kind == "lpips" else None)


def build_perceptual(choice: PerceptualChoice) -> torch.nn.Module | None:
    """The frozen distance module of a choice (None when off), on the CPU."""
    import importlib.resources

    import fsspec

    from coarse2fine.train.models import perceptual

    if choice.kind == "lpips":
        with fsspec.open(choice.backbone_uri, "rb") as f:
            backbone = torch.load(f, map_location="cpu", weights_only=True)
        heads_file = importlib.resources.files("torchmetrics.functional.image") / "lpips_models" / "vgg.pth"
        return perceptual.LPIPS(backbone, torch.load(str(heads_file), map_location="cpu", weights_only=True))
    if choice.kind == "inception":
        from coarse2fine.evaluate.inception import default_fid_weights

        return perceptual.InceptionStemDistance(torch.jit.load(str(default_fid_weights()), map_location="cpu"))
    return perceptual.MSSSIMDistance() if choice.kind == "ms_ssim" else None


def reconstruction_loss(recon_B3HW: torch.Tensor, x_B3HW: torch.Tensor) -> torch.Tensor:
    """L2 on the spatial image, i.e. after the IDWT of the decoder output (seed §4.1)."""
    return F.mse_loss(recon_B3HW, x_B3HW)


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: list[torch.Tensor]) -> torch.Tensor:
    """VQGAN's adaptive adversarial weight (Esser et al. 2021, eq. 7): ‖∇_L rec‖ / (‖∇_L g‖ + 1e-4)
    over the decoder's last layer L, clamped to [0, 1e4] and detached, so the adversarial gradient
    reaching the decoder's output starts at the reconstruction gradient's size."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    norm = lambda grads: torch.sqrt(sum(g.pow(2).sum() for g in grads))  # noqa: E731
    return (norm(rec_grads) / (norm(g_grads) + ADAPTIVE_EPS)).clamp(0, ADAPTIVE_MAX).detach()


def generator_hinge(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def discriminator_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def lecam_regularizer(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
                      ema_fake: torch.Tensor, decay: float = 0.99) -> torch.Tensor:
    """LeCam regularisation (Tseng et al. 2021, as its official code): update the exponential moving
    averages of the discriminator's mean outputs on real and fake images in place (``decay`` 0.99),
    then ``mean(relu(D(real) − ema_fake)²) + mean(relu(ema_real − D(fake))²)``."""
    with torch.no_grad():
        ema_real.mul_(decay).add_((1 - decay) * logits_real.mean())
        ema_fake.mul_(decay).add_((1 - decay) * logits_fake.mean())
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
