"""Tokenizer losses: the perceptual distances (LPIPS-VGG, Inception stem, MS-SSIM), how ``auto``
picks one, and VQGAN's adaptive adversarial weight."""

from __future__ import annotations

import fsspec
import pytest
import torch
import torch.nn.functional as F

from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train.losses import PerceptualChoice, adaptive_weight, build_perceptual, resolve_perceptual
from coarse2fine.train.models.perceptual import vgg16_features

VGG_URI = "memory://weights/vgg16.pth"


@pytest.fixture(scope="module")
def vgg_uri():
    """A VGG16 state dict in torchvision's key layout (random weights: nothing may be downloaded)."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    with fsspec.open(VGG_URI, "wb") as f:
        torch.save(state, f)
    yield VGG_URI
    fsspec.filesystem("memory").rm(VGG_URI)


def blur(x_B3HW: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x_B3HW, (k // 2,) * 4, mode="replicate"), k, 1) if k > 1 else x_B3HW


@pytest.mark.parametrize("kind", ["lpips", "inception", "ms_ssim"])
def test_perceptual_distance_is_zero_for_identical_images_grows_with_blur_and_has_gradients(kind, vgg_uri):
    distance = build_perceptual(PerceptualChoice(kind, vgg_uri if kind == "lpips" else None))
    torch.manual_seed(1)
    x = torch.rand(3, 3, 64, 64)
    assert torch.allclose(distance(x, x), torch.zeros(3), atol=1e-6)
    d = [distance(blur(x, k), x).mean().item() for k in (1, 3, 5, 9)]
    assert d[0] < 1e-6 and d[1] < d[2] < d[3], d
    y = blur(x, 3).requires_grad_()
    distance(y, x).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in distance.parameters())  # the network itself stays fixed


def test_lpips_uses_the_given_backbone_and_the_shipped_heads(vgg_uri):
    """The first tap (relu1_2) recomputed by hand from the stored weights, and LPIPS's value from
    its definition with the torchmetrics wheel's heads for that tap alone."""
    lp = build_perceptual(PerceptualChoice("lpips", vgg_uri))
    with fsspec.open(vgg_uri, "rb") as f:
        state = torch.load(f)
    x = torch.rand(2, 3, 16, 16)
    h = (x * 2 - 1 - lp.shift) / lp.scale
    h = F.relu(F.conv2d(h, state["features.0.weight"], state["features.0.bias"], padding=1))
    h = F.relu(F.conv2d(h, state["features.2.weight"], state["features.2.bias"], padding=1))
    torch.testing.assert_close(lp._feats(x)[0], h)
    assert lp.heads[0].shape == (64,) and (lp.heads[0] >= 0).all() and lp.heads[0].sum() > 0  # learned, non-negative


def test_auto_picks_lpips_when_the_weights_are_there_and_the_inception_stem_otherwise(vgg_uri, tmp_path):
    assert resolve_perceptual("auto", 0.1, vgg_uri) == PerceptualChoice("lpips", vgg_uri)
    assert resolve_perceptual("auto", 0.1, None, str(tmp_path)).kind == "inception"  # an empty torch hub
    (tmp_path / "checkpoints").mkdir()
    with fsspec.open(vgg_uri, "rb") as src:
        (tmp_path / "checkpoints" / "vgg16-397923af.pth").write_bytes(src.read())
    assert resolve_perceptual("auto", 0.1, None, str(tmp_path)).kind == "lpips"
    with pytest.raises(UserValueError, match="tokenizer.train.lpips_backbone"):
        resolve_perceptual("lpips", 0.1, "memory://nowhere/vgg16.pth")
    assert resolve_perceptual("ms_ssim", 0.1, None).kind == "ms_ssim"
    assert resolve_perceptual("lpips", 0.0, None).kind == "off"


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    """For out = W·x: ∇_W Σout² = 2·out·xᵀ and ∇_W Σout = 1·xᵀ, computed by hand."""
    torch.manual_seed(0)
    W = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(3, 5)
    out = W @ x  # (4, 5)
    w = adaptive_weight(out.pow(2).sum(), out.sum(), [W])
    expected = (2 * out.detach() @ x.T).norm() / ((torch.ones(4, 5) @ x.T).norm() + 1e-4)
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad and w > 0
    # clamped at 1e4 when the adversarial gradient vanishes
    assert adaptive_weight(out.pow(2).sum(), (W * 0).sum() + out.sum() * 0, [W]) == pytest.approx(1e4)
