"""The real TF-2015 Inception network on real photographs: wrapper contract, FID behaviour, IS, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torchmetrics.image.fid import FrechetInceptionDistance

from conftest import tiny_configs, write_demo
from coarse2fine.evaluate import image_sets
from coarse2fine.evaluate.config import EvaluateConfig
from coarse2fine.evaluate.fid import STATS_DIR, Evaluator
from coarse2fine.evaluate.inception import InceptionFeatureExtractor
from coarse2fine.pipelines.cli import main
from coarse2fine.preprocess import schema
from coarse2fine.preprocess.beam_jobs import ingest
from coarse2fine.preprocess.demo_data import demo_crops

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatureExtractor:
    return InceptionFeatureExtractor()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """24 real-photo crops at 64x64 as float (N, 3, H, W) in [0, 1]."""
    arr = np.stack([np.asarray(c, np.float32) / 255 for _, c in demo_crops(24, 64, seed=7)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def test_features_do_not_depend_on_batch_size(extractor, photos):
    x = photos[:4]
    together = extractor(x)
    alone = torch.cat([extractor(x[i : i + 1]) for i in range(4)])
    assert together.shape == (4, 2048)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # uint8 input (torchmetrics' convention) gives the same features as float in [0, 1]
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(extractor(as_uint8), extractor(as_uint8.float() / 255), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (3, 64, 64), (2, 4, 64, 64)])
def test_wrong_shapes_are_rejected_with_a_clear_error(extractor, shape):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        extractor(torch.zeros(shape))


def test_is_a_torchmetrics_custom_feature_extractor(extractor, photos):
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    metric.update(photos[:6], real=True)
    ours = extractor(photos[:6]).double().sum(0)
    torch.testing.assert_close(metric.real_features_sum, ours, rtol=1e-6, atol=1e-3)


def test_fid_is_zero_for_same_set_and_grows_with_noise_and_blur(photos):
    ev = Evaluator(EvaluateConfig(batch_size=12, kid_subsets=10))
    real = ev.features([photos[:12], photos[12:]])
    assert abs(ev.compare_features(real, real).fid) < 1e-3
    rng = np.random.default_rng(0)

    def noisy(sigma):
        return torch.clamp(photos + torch.from_numpy(rng.normal(0, sigma, photos.shape).astype(np.float32)), 0, 1)

    def blurred(sigma):
        return torch.from_numpy(gaussian_filter(photos.numpy(), sigma=(0, 0, sigma, sigma)))

    for degrade, levels in ((noisy, (0.05, 0.15, 0.4)), (blurred, (0.7, 1.5, 3.0))):
        fids = [ev.compare_features(real, ev.features([degrade(s)])).fid for s in levels]
        assert fids[0] > 1.0 and all(a < b for a, b in zip(fids, fids[1:])), (degrade.__name__, fids)


def test_is_skipped_with_reason_without_classifier_weights(photos):
    ev = Evaluator(EvaluateConfig())
    res = ev.compare_features(np.random.default_rng(0).normal(size=(10, 4)), np.random.default_rng(1).normal(size=(10, 4)))
    res = ev.inception_score([photos[:2]], res)
    assert res.inception_score is None and "evaluate.inception_weights" in res.is_skipped_reason
    assert "is_mean" not in res.metrics()


def test_is_with_a_configured_classifier_file(photos, tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2))], dim=1) * 10

    path = tmp_path / "classifier.pt"
    torch.jit.script(Tiny()).save(str(path))
    ev = Evaluator(EvaluateConfig(inception_weights=str(path), is_splits=2))
    res = ev.compare_features(np.random.default_rng(0).normal(size=(10, 4)), np.random.default_rng(1).normal(size=(10, 4)))
    res = ev.inception_score([photos[:8]], res)
    assert res.is_skipped_reason is None and 1.0 <= res.inception_score <= 3.0
    assert res.protocol["is_classifier"] == str(path)


def test_reference_features_cached_next_to_dataset_and_cli(tmp_path, capsys):
    src = write_demo(tmp_path / "src", 6, resolution=32)
    data, pre, store = tiny_configs(str(src), str(tmp_path / "store"))
    uri = ingest(data, pre, store).uris["images"]
    ev = Evaluator(EvaluateConfig(batch_size=4, kid_subset_size=6, kid_subsets=2))
    first = ev.reference_features(uri)
    fs, path = schema.url_to_fs(schema.join(uri, STATS_DIR))
    (cached,) = fs.ls(path)
    half = ev.reference_features(uri, factor=2)  # the real data at 16 px: its own cache entry
    assert len(fs.ls(path)) == 2 and np.abs(half - first).max() > 1e-2
    pooled = [torch.nn.functional.avg_pool2d(b, 2) for b in image_sets.iter_batches(uri, 4)]
    np.testing.assert_allclose(half, ev.features(pooled), rtol=1e-4, atol=1e-4)

    def no_network(*args, **kwargs):
        raise AssertionError("cached reference features were recomputed")

    ev.features = no_network  # a second call must read the cache
    np.testing.assert_allclose(ev.reference_features(uri), first, rtol=1e-6)
    np.testing.assert_allclose(ev.reference_features(uri, factor=2), half, rtol=1e-6)
    assert schema.read_table(uri).num_rows == 6  # the dataset itself is untouched
    assert main(["fid", uri, str(src), "--set", "evaluate.kid_subset_size=6", "--set", "evaluate.kid_subsets=2"]) == 0
    out = capsys.readouterr().out
    fid = float(out.split("FID ")[1].split()[0])
    assert abs(fid) < 1e-2 and "feature_net_sha1" in out and "IS skipped" in out
