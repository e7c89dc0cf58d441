"""CQ (channel-wise quantization) and its spatial-VQ baseline: quantizer math against brute force,
the quantization axis, straight-through gradients, and training through the CLI on tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from coarse2fine.train import methods
from coarse2fine.train.models.conv_vq import ConvVQConfig, build_conv_vq
from coarse2fine.train.models.quantizer import EuclideanVQ

REPO = Path(__file__).resolve().parents[1]


def tiny(axis: str = "channel", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_conv_vq(ConvVQConfig(resolution=32, axis=axis, size="tiny", z_channels=16, codebook_size=64, **kw))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), dim=st.integers(1, 20), k=st.integers(2, 40))
def test_nearest_code_is_the_brute_force_argmin(seed, n, dim, k):
    g = torch.Generator().manual_seed(seed)
    vq = EuclideanVQ(dim, k).double()
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(k, dim, generator=g, dtype=torch.float64))
    z = torch.randn(2, n, dim, generator=g, dtype=torch.float64)
    q, idx, aux = vq(z)
    for b in range(2):
        for i in range(n):
            dists = [float(((z[b, i] - vq.codebook[j].detach()) ** 2).sum()) for j in range(k)]
            assert dists[idx[b, i]] == pytest.approx(min(dists))
    torch.testing.assert_close(q, vq.codebook[idx])  # straight-through value = the code
    torch.testing.assert_close(vq.indices_to_codes(idx), q)  # round trip of the quantizer contract
    expected = 1.25 * ((z - vq.codebook[idx]) ** 2).mean()  # codebook + 0.25 · commitment, same value (eq. 3)
    torch.testing.assert_close(aux, expected)


def test_cq_quantizes_channels_with_codes_of_dimension_h1w1():
    m = tiny()
    assert m.quantizer.codebook.shape == (64, 4 * 4)  # K × H1·W1 (32 px, f = 8)
    z = torch.randn(2, 16, 4, 4)  # (B, C, H1, W1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    _, idx, _ = m.quantizer(m.to_vectors(z))
    _, idx_perm, _ = m.quantizer(m.to_vectors(z[:, perm]))
    assert idx.shape == (2, 16) and torch.equal(idx_perm, idx[:, perm])  # permuting channels permutes tokens


def test_spatial_baseline_quantizes_positions():
    m = tiny("spatial")
    assert m.quantizer.codebook.shape == (64, 16)  # K × C
    z = torch.randn(2, 16, 4, 4)
    _, idx, _ = m.quantizer(m.to_vectors(z))
    flipped = torch.flip(z, dims=[-1])  # moving positions moves their tokens
    _, idx_f, _ = m.quantizer(m.to_vectors(flipped))
    assert torch.equal(idx_f.view(2, 4, 4), torch.flip(idx.view(2, 4, 4), dims=[-1]))
    low = tiny("spatial", code_dim=8)
    assert low.quantizer.codebook.shape == (64, 8)


@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_straight_through_gradients_reach_the_encoder(axis):
    m = tiny(axis)
    x = torch.rand(2, 3, 32, 32)
    recon, idx, losses = m(x)
    ((recon - x) ** 2).mean().backward()  # the reconstruction loss alone, no quantizer loss
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    torch.testing.assert_close(m.decode_indices(idx), recon, rtol=0, atol=1e-4)  # ids decode to the reconstruction


def test_methods_write_the_layout_their_generators_read():
    cq, vq = methods.tokenizer("cq"), methods.tokenizer("vqgan")
    cfg = cq.model_config(cq.params(size="tiny", z_channels=16, codebook_size=64), 32)
    assert [(c.name, c.shape, c.role) for c in cq.layout(cfg)] == [("ids", (16,), "channel")]
    cfg_s = vq.model_config(vq.params(size="tiny", z_channels=16, codebook_size=64), 32)
    assert [(c.name, c.shape, c.role) for c in vq.layout(cfg_s)] == [("ids", (4, 4), "scale")]
    methods.generator("ar_sit").accept(vq.layout(cfg_s))  # AR over the spatial map is possible


@pytest.mark.parametrize("kw, msg", [({"downsample": 6}, "power of two"), ({"resolution": 36}, "not divisible"),
                                     ({"axis": "channel", "code_dim": 8}, "spatial axis only")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ConvVQConfig(**({"resolution": 32} | kw))


@pytest.mark.slow
def test_cq_and_spatial_vq_train_tokenize_evaluate_through_the_cli(tmp_path, capsys):
    import mlflow
    import ray

    from coarse2fine.pipelines.cli import main
    from coarse2fine.preprocess import schema

    def sets(method):
        return ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.source={tmp_path}/imgs",
                "--set", f"storage.root={tmp_path}/store", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                "--set", f"tokenizer.method={method}"]

    try:
        assert main(["demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]) == 0
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        for method, shape, role in (("cq", [16], "channel"), ("vqgan", [4, 4], "scale")):
            assert main(["train-tokenizer", *sets(method)]) == 0
            run_id = capsys.readouterr().out.split("tokenizer run ")[1].split()[0]
            assert main(["evaluate", "--run", run_id, *sets(method)]) == 0
            metrics = mlflow.get_run(run_id).data.metrics
            assert "eval/psnr_32px" in metrics and 0 < metrics[f"codebook_usage/{role}_0"] <= 1
            assert main(["tokenize", "--run", run_id, *sets(method)]) == 0
            capsys.readouterr()
            tokens_uri = mlflow.get_run(run_id).data.tags["c2f.tokens"]
            layout = schema.read_manifest(tokens_uri)["config"]["layout"]
            assert layout == [{"name": "ids", "shape": shape, "dtype": "int32", "vocab": 64, "role": role,
                              "code_dim": 0, "scale": 1.0}]
            ids = schema.tensor_numpy(schema.read_table(tokens_uri).column("ids"))
            assert ids.shape == (12, *shape) and 0 <= ids.min() and ids.max() < 64
            assert np.unique(ids).size > 1
    finally:
        ray.shutdown()


def test_lecam_regularizer_against_its_formula():
    from coarse2fine.train.losses import lecam_regularizer

    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-0.5, 1.0, 0.2])
    ema_r, ema_f = torch.tensor(0.3), torch.tensor(-0.2)
    reg = lecam_regularizer(real, fake, ema_r, ema_f, decay=0.9)
    er, ef = 0.9 * 0.3 + 0.1 * real.mean().item(), 0.9 * -0.2 + 0.1 * fake.mean().item()
    assert ema_r.item() == pytest.approx(er) and ema_f.item() == pytest.approx(ef)  # updated in place
    expected = np.mean([max(0.0, r - ef) ** 2 for r in real.tolist()]) + \
        np.mean([max(0.0, er - f) ** 2 for f in fake.tolist()])
    assert reg.item() == pytest.approx(expected)


def test_adversarial_step_with_lecam_updates_the_discriminator_averages():
    from coarse2fine.train.losses import LossWeights
    from coarse2fine.train.models.discriminator import PatchDiscriminator
    from coarse2fine.train.steps import to_floats, tokenizer_train_step, warmup_cosine

    m, disc = tiny(), PatchDiscriminator(channels=8, layers=2)
    opt, d_opt = torch.optim.Adam(m.parameters(), 1e-3), torch.optim.Adam(disc.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4))
    metrics = to_floats(tokenizer_train_step(m, opt, sched, torch.rand(2, 3, 32, 32),
                                             LossWeights(adversarial=0.1, lecam=0.001), disc=disc, disc_optimizer=d_opt,
                                             groups=[("channel_0", 64, 16)],
                                             last_layer=methods.tokenizer("cq").last_layer(m)))
    assert metrics["lecam"] >= 0 and "d_loss" in metrics and 0 < metrics["batch_usage/channel_0"] <= 1
    assert disc.ema_real.item() != 0 and disc.ema_fake.item() != 0


def test_euclidean_codebook_init_and_dimensions():
    """taming-transformers' init, uniform in ±1/K (filling the interval); the code dimension
    defaults to the feature dimension (no projections) and may be lower or higher than it."""
    K = 4096
    vq = EuclideanVQ(8, K)
    c = vq.codebook.detach()
    assert c.shape == (K, 8) and isinstance(vq.proj_in, torch.nn.Identity)
    assert c.abs().max() <= 1 / K and c.max() > 0.9 / K and c.min() < -0.9 / K
    assert abs(float(c.mean())) < 0.05 / K  # centred: a symmetric interval
    for code_dim in (3, 12):
        vq = EuclideanVQ(8, 16, code_dim=code_dim)
        assert vq.codebook.shape == (16, code_dim) and isinstance(vq.proj_in, torch.nn.Linear)
        q, idx, _ = vq(torch.randn(2, 5, 8))
        assert q.shape == (2, 5, 8) and torch.allclose(q, vq.indices_to_codes(idx), atol=1e-6)  # z + (e - z) ≈ e
