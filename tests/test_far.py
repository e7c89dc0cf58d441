"""FAR and MAR over continuous tokens (FAR seed; official code yuhuUSTC/FAR, LTH14/mar): the
diffusion head, the frequency levels, MAR's masking and both samplers, the KL tokenizer, and the
CLI chain on tiny data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_sample_grid
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train import continuous, methods
from coarse2fine.train.methods.base import SampleSettings
from coarse2fine.train.models.diffusion import DiffusionHead, cosine_alpha_bar, timestep_embedding

REPO = Path(__file__).resolve().parents[1]


def test_cosine_schedule_matches_its_closed_form():
    """ᾱ_t = f(t+1)/f(0) with f(t) = cos((t/T + s)/(1 + s)·π/2)², s = 0.008 (improved DDPM), away
    from the 0.999 beta cap that only binds at the last steps."""
    ab = cosine_alpha_bar(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < 1e-4


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), dim=8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    torch.testing.assert_close(e[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_diffusion_loss_decreases_on_a_fixed_batch_and_samples_approach_the_targets():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=64, depth=2)
    z = torch.randn(16, 8)  # one condition per target
    target = torch.randn(16, 4)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    first = head.loss(target, z, generator=g).mean().item()
    for _ in range(400):
        loss = head.loss(target.repeat(8, 1), z.repeat(8, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    assert head.loss(target, z, generator=g).mean().item() < 0.5 * first
    out = head.sample(z, steps=25, generator=torch.Generator().manual_seed(0))
    # a denoiser fitted to one point per condition samples near it (vs ~2·4 for an unrelated N(0, I) draw)
    assert ((out - target) ** 2).sum(-1).mean() < 1.0


def test_sampling_with_a_fixed_seed_is_deterministic_and_cfg_one_is_unguided():
    torch.manual_seed(0)
    head = DiffusionHead(4, 8, 32, 2)
    torch.nn.init.normal_(head.net.out.weight, std=0.1)  # zero-initialised output: make ε depend on z
    z = torch.randn(6, 8)
    a = head.sample(z, 10, generator=torch.Generator().manual_seed(3))
    b = head.sample(z, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    guided = head.sample(torch.cat([z, z]), 10, cfg=4.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(guided, a)  # cond = uncond: guidance changes nothing
    assert a.shape == guided.shape == (6, 4)


@settings(max_examples=20, deadline=None)
@given(k=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 99))
def test_lowpass_ignores_detail_with_zero_block_means(k, seed):
    """lowpass_k(z + δ) = lowpass_k(z) when δ has zero k×k block means (area = block means)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, 8, 8, generator=g)
    d = torch.randn(2, 3, 8, 8, generator=g)
    b = 8 // k
    delta = d - F.avg_pool2d(d, b).repeat_interleave(b, 2).repeat_interleave(b, 3)  # zero mean in each block
    torch.testing.assert_close(continuous.lowpass(z + delta, k), continuous.lowpass(z, k), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(continuous.lowpass(z + d, k), continuous.lowpass(z, k)) or k == 8


def test_level_0_is_zeros_and_the_finest_level_keeps_the_latent():
    z = torch.randn(2, 3, 8, 8)
    assert torch.equal(continuous.lowpass(z, 0), torch.zeros_like(z))
    torch.testing.assert_close(continuous.lowpass(z, 8), z)
    far = methods.generator("far")
    cfg = far.model_config(far.params(), LAYOUT, 0)
    assert cfg.schedule == list(range(8))  # 8 steps at an 8×8 latent; the last step predicts the full latent
    with pytest.raises(ValueError, match="levels must start at 0"):
        far.model_config(far.params(levels=(1, 2)), LAYOUT, 0)


LAYOUT = [TokenColumn("mean", (4, 8, 8), "float16", 0, "latent", scale=0.5),
          TokenColumn("logvar", (4, 8, 8), "float16", 0, "latent", scale=0.5)]


def test_mar_mask_ratio_is_truncated_normal_on_0_7_to_1():
    g = torch.Generator().manual_seed(0)
    r = np.array([continuous.mask_ratio(g) for _ in range(4000)])
    assert r.min() >= 0.7 and r.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 − 0.25·φ(0)−φ(−1.2) / (Φ(0) − Φ(−1.2))
    from scipy.stats import truncnorm
    assert r.mean() == pytest.approx(truncnorm.mean(-1.2, 0, loc=1, scale=0.25), abs=0.01)
    mask = continuous.random_mask(3, 64, 0.71, "cpu", g)
    assert mask.sum(1).tolist() == [math.ceil(64 * 0.71)] * 3


def tiny_generator(name: str):
    torch.manual_seed(0)
    m = methods.generator(name)
    cfg = m.model_config(m.params(size="tiny", diffusion_steps=4), LAYOUT, 3)
    return m, m.build(cfg).eval()


def test_the_encoder_sees_only_visible_tokens():
    """Masked tokens' values cannot change MAR's conditions (the encoder drops them)."""
    _, model = tiny_generator("mar")
    x = torch.randn(2, 64, 4)
    mask = continuous.random_mask(2, 64, 0.75, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(x, torch.tensor([0, 1]), mask)
        b = model(torch.where(mask[..., None], torch.randn(2, 64, 4), x), torch.tensor([0, 1]), mask)
        c = model(x + 1, torch.tensor([0, 1]), mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", ["mar", "far"])
def test_generator_losses_decrease_and_samples_are_deterministic(name):
    method, model = tiny_generator(name)
    tok = methods.tokenizer("kl")
    tokenizer = tok.build(tok.model_config(tok.params(z_channels=4), 64)).eval()
    tokens = torch.randn(4, 2 * 4 * 64) * 0.5  # [mean, logvar] rows
    cond = torch.tensor([0, 1, 2, 0])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    first = sum(method.loss(model, tokens, cond, tokenizer)[0].item() for _ in range(8)) / 8
    for _ in range(60):
        loss, _ = method.loss(model, tokens, cond, tokenizer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    last = sum(method.loss(model, tokens, cond, tokenizer)[0].item() for _ in range(8)) / 8
    assert last < 0.8 * first, (first, last)
    model.eval()
    s = SampleSettings(guidance=2.0, steps=4 if name == "mar" else None)
    lat, images = method.sample(model, tokenizer, cond[:2], s, seed=7)
    lat2, _ = method.sample(model, tokenizer, cond[:2], s, seed=7)
    assert torch.equal(lat, lat2) and lat.shape == (2, 4 * 64) and images.shape == (2, 3, 64, 64)


def test_mar_reveals_every_token_once_over_its_steps(monkeypatch):
    """With n steps MAR reveals ⌊L·(cos(π/2·s/n) − …)⌋ tokens per step, at least one, all by the end."""
    _, model = tiny_generator("mar")
    revealed = []
    real = model.head.sample

    def spy(z, *a, **kw):
        revealed.append(len(z))
        return real(z, *a, **kw)

    monkeypatch.setattr(model.head, "sample", spy)
    continuous.sample_mar(model, torch.tensor([0]), 8, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert sum(revealed) == 64 and min(revealed) >= 1 and len(revealed) == 8
    expected, left = [], 64
    for s in range(8):
        nxt = 0 if s == 7 else max(1, min(left - 1, math.floor(64 * math.cos(math.pi / 2 * (s + 1) / 8))))
        expected.append(left - nxt)
        left = nxt
    assert revealed == expected


def test_kl_tokenizer_layout_calibration_and_round_trip():
    kl = methods.tokenizer("kl")
    cfg = kl.model_config(kl.params(z_channels=4), 32)
    torch.manual_seed(0)
    model = kl.build(cfg).eval()
    layout = kl.layout(cfg)
    assert [(c.name, c.shape, c.dtype, c.role) for c in layout] == [("mean", (4, 4, 4), "float16", "latent"),
                                                                    ("logvar", (4, 4, 4), "float16", "latent")]
    x = torch.rand(6, 3, 32, 32)
    scale = kl.latent_scale(model, x)
    assert scale == kl.latent_scale(model, x)  # seeded: the tokens fingerprint holds it
    mean, logvar = model.encode(x)
    z_std = torch.stack([(mean + torch.randn_like(mean) * (0.5 * logvar).exp()).std() for _ in range(50)]).mean()
    assert scale == pytest.approx(1 / z_std.item(), rel=0.05)
    cols = kl.encode(model, x)
    assert layout[0].scale == 1.0  # until the tokens stage calibrates it on the training images
    np.testing.assert_allclose(cols["mean"], mean.detach().numpy(), atol=2e-3, rtol=2e-3)
    recon, _ = kl.reconstruct(model, x)
    with torch.no_grad():
        torch.testing.assert_close(recon, model.decode(mean).clamp(0, 1))  # eval: the posterior mean is decoded


def test_kl_term_is_the_gaussian_kl_to_the_standard_normal():
    from torch.distributions import Normal, kl_divergence

    kl = methods.tokenizer("kl")
    model = kl.build(kl.model_config(kl.params(z_channels=4), 32)).eval()
    x = torch.rand(3, 3, 32, 32)
    _, _, losses = model(x)
    mean, logvar = model.encode(x)
    want = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(losses["kl"], want.detach(), rtol=1e-4, atol=1e-3)


def test_generators_refuse_discrete_tokens_and_discrete_ones_refuse_latents():
    from coarse2fine.train.methods.base import UnsupportedError

    with pytest.raises(UnsupportedError, match="models continuous latents"):
        methods.generator("far").accept([TokenColumn("ids", (4, 4), "int32", 64, "scale")])
    with pytest.raises(UnsupportedError, match="int32 scale tokens"):
        methods.generator("ar_sit").accept(LAYOUT)


@pytest.mark.slow
def test_kl_mar_far_train_tokenize_generate_evaluate_through_the_cli(tmp_path, capsys):
    import mlflow
    import ray

    from coarse2fine.pipelines.cli import main
    from coarse2fine.preprocess import schema

    sets = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.source={tmp_path}/imgs",
            "--set", f"storage.root={tmp_path}/store", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", "tokenizer.method=kl"]
    try:
        assert main(["demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]) == 0
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        for gen in ("far", "mar"):
            assert main(["train-generator", *sets, "--set", f"generator.method={gen}"]) == 0
            run_id = capsys.readouterr().out.split("generator run ")[1].split()[0]
            tags = mlflow.get_run(run_id).data.tags
            assert tags["c2f.method"] == gen and tags["c2f.tokenizer_method"] == "kl"
            manifest = schema.read_manifest(tags["c2f.tokens"])
            layout = manifest["config"]["layout"]
            assert [(c["name"], c["dtype"], c["role"]) for c in layout] == [("mean", "float16", "latent"),
                                                                          ("logvar", "float16", "latent")]
            assert layout[0]["scale"] > 0 and layout[0]["shape"] == [4, 4, 4]
            grid = tmp_path / f"{gen}.png"
            assert main(["generate", "--run", run_id, "--n", "2", "--class", "0", "--out", str(grid),
                         *sets, "--set", f"generator.method={gen}"]) == 0
            assert_sample_grid(grid, 2, 32)
            assert main(["evaluate", "--run", run_id, *sets, "--set", f"generator.method={gen}"]) == 0
            metrics = mlflow.get_run(run_id).data.metrics
            # FAR: one step per level of the 4×4 latent; MAR: 8 steps and its default 64 capped at 16 tokens
            for s in [4] if gen == "far" else [8, 16]:
                assert f"eval/fid_steps{s}" in metrics and metrics[f"eval/diffusion_passes_steps{s}"] > 0
        tok_run = tags["c2f.tokenizer_run"]
        assert main(["evaluate", "--run", tok_run, *sets]) == 0
        assert "eval/psnr_32px" in mlflow.get_run(tok_run).data.metrics
    finally:
        ray.shutdown()
