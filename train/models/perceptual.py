"""Perceptual distances for tokenizer training (SIT seed B.1: weight 0.1, following ViT-VQGAN/VQGAN,
which use LPIPS). Each module maps two image batches in [0, 1] to a per-image distance (B,).

* :class:`LPIPS` — LPIPS-VGG (Zhang et al. 2018, the ``lpips`` package's v0.1): VGG16 activations
  after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of inputs shifted/scaled by the package's
  ``ScalingLayer``; each unit-normalised over channels, squared difference, weighted per channel by
  the learned linear heads, averaged over space, summed over layers. The heads are the package's
  ``vgg.pth`` as shipped in the torchmetrics wheel; the backbone is torchvision's ImageNet VGG16
  state dict (``features.*`` keys), which the caller loads (nothing is downloaded here).
* :class:`InceptionStemDistance` — the offline stand-in: the same LPIPS-style distance with equal
  channel weights (the ``lpips`` package's ``lpips=False`` baseline) on the stem of the TF-Inception
  FID network the project already ships (``conv_2`` and ``conv_4``, the last layer before each of
  the stem's two poolings, as LPIPS taps the last layer before each VGG pooling). FID uses the
  same network's pooled ``mixed_10`` features, so only the stem is used, and every run records
  which perceptual loss it trained with.
* :class:`MSSSIMDistance` — pretrained-free: 1 − MS-SSIM (Wang et al. 2003; torchmetrics' Gaussian
  11-px window), with as many of the standard five scale weights as the image side allows, renormalised.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# torchvision's VGG16 ``features``: conv widths, "M" = 2×2 max-pool; LPIPS taps the ReLU before each pool
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# the lpips package's ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1]
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales
SSIM_WINDOW = 11
INCEPTION_TAPS = ("conv_2", "conv_4")
INCEPTION_STEM = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4")
MIN_INCEPTION_SIDE = 32  # conv_4's input after two stride-2 stages and unpadded 3×3 convs


def _unit(f_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise each position's channel vector (LPIPS's ``normalize_tensor``)."""
    return f_BCHW / torch.sqrt(f_BCHW.pow(2).sum(1, keepdim=True) + eps)


def feature_distance(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor],
                     heads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_layers mean_hw Σ_c w_c (unit(a) − unit(b))²: per-image distances (B,); ``heads`` (C,)
    per layer, or equal weights."""
    total = 0
    for i, (a, b) in enumerate(zip(feats_a, feats_b)):
        d = (_unit(a) - _unit(b)).pow(2)  # (B, C, h, w)
        w = heads[i].view(1, -1, 1, 1) if heads is not None else 1
        total = total + (d * w).sum(1).mean((1, 2))  # (B,)
    return total


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part with torchvision's module indices (so its state dict loads by key)."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


class _Frozen(nn.Module):
    """Fixed weights, always in eval mode; gradients flow to the inputs only."""

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


class LPIPS(_Frozen):
    def __init__(self, backbone_state: dict[str, torch.Tensor], heads_state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = vgg16_features()
        missing = [k for k in self.features.state_dict() if f"features.{k}" not in backbone_state]
        if missing:
            raise ValueError(f"not a torchvision VGG16 state dict: no features.{missing[0]}")
        self.features.load_state_dict({k: backbone_state[f"features.{k}"] for k in self.features.state_dict()})
        self.taps = [i - 1 for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)] + [len(self.features) - 1]
        self.heads = nn.ParameterList(heads_state[f"lin{i}.model.1.weight"].flatten() for i in range(len(self.taps)))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _feats(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x_B3HW * 2 - 1 - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
        return feature_distance(self._feats(a_B3HW), self._feats(b_B3HW), list(self.heads))


class InceptionStemDistance(_Frozen):
    def __init__(self, inception: torch.jit.ScriptModule) -> None:
        """``inception``: the FID TorchScript network (``evaluate/inception.py``); its stem is kept."""
        super().__init__()
        layers = dict(inception.net.layers.named_children())
        self.stem = nn.ModuleDict({name: layers[name] for name in INCEPTION_STEM})
        self.freeze()

    def _feats(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        assert min(x_B3HW.shape[-2:]) >= MIN_INCEPTION_SIDE, f"images below {MIN_INCEPTION_SIDE}px"
        h, out = (x_B3HW * 255 - 128) / 128, []  # the FID network's TF-2015 input scaling
        for name, layer in self.stem.items():
            h = layer(h)
            if name in INCEPTION_TAPS:
                out.append(h)
        return out

    def forward(self, a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
        return feature_distance(self._feats(a_B3HW), self._feats(b_B3HW))


class MSSSIMDistance(nn.Module):
    def forward(self, a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

        side = min(a_B3HW.shape[-2:])
        n = max(1, min(len(MS_SSIM_BETAS), (side // SSIM_WINDOW).bit_length()))  # side / 2^(n-1) ≥ window
        betas = torch.tensor(MS_SSIM_BETAS[:n])
        betas = tuple((betas / betas.sum()).tolist())
        # "relu" clamps negative contrast terms before the fractional powers (NaN-free gradients)
        score = ms_ssim(a_B3HW.float(), b_B3HW.float(), data_range=1.0, betas=betas, normalize="relu",
                        reduction="none")
        return 1 - score  # (B,)
