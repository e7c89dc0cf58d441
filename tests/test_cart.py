"""CART (CART seed §3): base-detail residual quantization, the next-detail transformer, the
images ⋈ decomposition join and the CLI chain on tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_sample_grid
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train import methods
from coarse2fine.train.methods.base import SampleSettings
from coarse2fine.train.models.cart import CARTConfig, build_cart
from coarse2fine.train.models.residual_vq import map_schedule, residual_quantize

REPO = Path(__file__).resolve().parents[1]


def identity_quantize(r_BCss):
    return r_BCss, torch.zeros(r_BCss.shape[0], *r_BCss.shape[2:], dtype=torch.long)


@settings(max_examples=25, deadline=None)
@given(order=st.integers(0, 3), depth=st.integers(1, 2), side=st.sampled_from([2, 4, 8]), seed=st.integers(0, 99))
def test_identity_quantization_and_phi_telescope_to_f_I(order, depth, side, seed):
    """Algorithm 1 then 2 with Q = id and φ = id: f̂ = f_{B_n} + Σ f_{D_k} = f_I, whatever the
    base scales (the last one is the latent side)."""
    g = torch.Generator().manual_seed(seed)
    f_bases = [torch.randn(2, 3, side, side, generator=g) for _ in range(order + 1)]  # f_I = f_{B_0} … f_{B_n}
    targets = [f_bases[order]] + [f_bases[k - 1] - f_bases[k] for k in range(1, order + 1)]
    scales = sorted({1, max(1, side // 2), side})
    f_hat, ids, loss = residual_quantize(targets, map_schedule(scales, order, depth), identity_quantize,
                                         lambda m, z: z, 0.25)
    torch.testing.assert_close(f_hat, f_bases[0], atol=1e-5, rtol=1e-5)
    assert len(ids) == len(scales) + order * depth and ids[0].shape == (2, 1, 1)


def var_multiscale_reference(f_BChw, codebook_KC, scales, phi):
    """VAR's multi-scale residual quantizer written out independently: area-down the residual,
    brute-force nearest code (cdist argmin), bicubic-up, φ, subtract."""
    rest, f_hat, ids = f_BChw.clone(), torch.zeros_like(f_BChw), []
    H = f_BChw.shape[-1]
    for m, s in enumerate(scales):
        small = F.interpolate(rest, size=(s, s), mode="area") if s != H else rest
        v = small.permute(0, 2, 3, 1).reshape(-1, small.shape[1])  # (B·s·s, C)
        idx = torch.cdist(v, codebook_KC).argmin(1)
        z = codebook_KC[idx].reshape(small.shape[0], s, s, -1).permute(0, 3, 1, 2)
        z = F.interpolate(z, size=(H, H), mode="bicubic") if s != H else z
        h = phi(m, z)
        rest, f_hat = rest - h, f_hat + h
        ids.append(idx.reshape(-1, s, s))
    return f_hat, ids


def test_order_0_is_vars_multiscale_residual_quantizer():
    torch.manual_seed(0)
    model = build_cart(CARTConfig(resolution=32, order=0, base_scales=(1, 2, 3, 4), z_channels=4, codebook_size=32)).eval()
    with torch.no_grad():
        model.quantizer.codebook.normal_()  # spread codes so that nearest-code choices are not ties
        x = torch.rand(3, 3, 32, 32)
        f_I = model.encoder(x * 2 - 1)
        f_hat, ids, _ = model.encode(x)  # order 0: no bases
        ref_hat, ref_ids = var_multiscale_reference(f_I, model.quantizer.codebook, [1, 2, 3, 4], model.phi)
    for a, b in zip(ids, ref_ids):
        assert torch.equal(a, b)
    torch.testing.assert_close(f_hat, ref_hat, atol=1e-5, rtol=1e-5)


def test_details_come_after_the_base_from_D_n_to_D_1():
    assert map_schedule((1, 2, 4), 3, 2) == [(1, 0), (2, 0), (4, 0), (4, 3), (4, 3), (4, 2), (4, 2), (4, 1), (4, 1)]
    cfg = CARTConfig(resolution=32, base_scales=(1, 2, 4), order=2)
    layout = methods.tokenizer("cart").layout(cfg)
    assert [(c.name, c.shape, c.role) for c in layout] == [
        ("base_0", (1, 1), "base"), ("base_1", (2, 2), "base"), ("base_2", (4, 4), "base"),
        ("detail_2_1", (4, 4), "detail"), ("detail_1_1", (4, 4), "detail")]
    assert {c.code_dim for c in layout} == {cfg.z_channels}


def test_detail_features_are_differences_of_base_features():
    """f_{D_k} = E(B_{k−1}) − E(B_k), f_{B_0} = E(I); the base target is E(B_n)."""
    torch.manual_seed(1)
    model = build_cart(CARTConfig(resolution=32, base_scales=(1, 2, 4), order=2, z_channels=4)).eval()
    x, bases = torch.rand(2, 3, 32, 32), torch.rand(2, 2, 3, 32, 32)
    with torch.no_grad():
        t = model.features(x, bases)
        e = [model.encoder(im * 2 - 1) for im in (x, bases[:, 0], bases[:, 1])]
    torch.testing.assert_close(t[0], e[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t[1], e[0] - e[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t[2], e[1] - e[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw, msg", [({"base_scales": (1, 2)}, "last base scale"), ({"base_scales": (2, 1, 4)},
                                     "non-decreasing"), ({"order": -1}, "order"), ({"phi_ratio": 2.0}, "phi_ratio")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CARTConfig(**({"resolution": 32, "base_scales": (1, 2, 4)} | kw))


def tiny_pair(order=2, num_classes=3):
    torch.manual_seed(0)
    tok_m, gen_m = methods.tokenizer("cart"), methods.generator("cart")
    tcfg = tok_m.model_config(tok_m.params(size="tiny", z_channels=4, codebook_size=16, order=order,
                                           base_scales=(1, 2, 4)), 32)
    tok = tok_m.build(tcfg).eval()
    gcfg = gen_m.model_config(gen_m.params(size="tiny"), tok_m.layout(tcfg), num_classes)
    return tok, gen_m.build(gcfg).eval(), gen_m


def test_maps_attend_only_to_themselves_and_earlier_maps():
    tok, gen, _ = tiny_pair()
    sizes = gen.cfg.map_sizes  # [1, 4, 16, 16, 16]
    ids = torch.randint(0, 16, (2, gen.cfg.seq_len))
    cond = torch.tensor([0, 1])
    with torch.no_grad():
        base = gen(tok.teacher_inputs(ids), cond)
        changed = ids.clone()
        changed[:, sizes[0] + sizes[1]: sum(sizes[:3])] = (changed[:, sizes[0] + sizes[1]: sum(sizes[:3])] + 1) % 16
        after = gen(tok.teacher_inputs(changed), cond)
    cut = sum(sizes[:3])  # map 2's tokens feed the inputs of maps 3, 4 only
    torch.testing.assert_close(after[:, :cut], base[:, :cut])
    assert not torch.allclose(after[:, cut:], base[:, cut:])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_kv_cached_sampling_equals_teacher_forcing(guidance):
    """The sampler's per-map logits (KV cache, inputs built from f̂ as it samples) equal the
    teacher-forced logits of the sampled sequence: same inputs, same mask."""
    tok, gen, method = tiny_pair()
    cond = torch.tensor([0, 2, 3])  # 3 = the null class
    seen = {}
    ids, images = method.sample(gen, tok, cond, SampleSettings(guidance=guidance), seed=5,
                                on_logits=lambda m, lg: seen.__setitem__(m, lg))
    assert ids.shape == (3, gen.cfg.seq_len) and images.shape == (3, 3, 32, 32)
    with torch.no_grad():
        inputs = tok.teacher_inputs(ids)
        full = gen(inputs, cond)
        if guidance != 1.0:
            null = gen(inputs, torch.full_like(cond, gen.cfg.null_class))
            full = null + guidance * (full - null)
    torch.testing.assert_close(torch.cat([seen[m] for m in range(len(seen))], 1), full, atol=1e-4, rtol=1e-4)
    again, _ = method.sample(gen, tok, cond, SampleSettings(guidance=guidance), seed=5)
    assert torch.equal(ids, again)  # a fixed seed gives the same samples


def test_decoding_all_maps_equals_the_tokenizers_reconstruction():
    tok, _, _ = tiny_pair()
    x, bases = torch.rand(2, 3, 32, 32), torch.rand(2, 2, 3, 32, 32)
    with torch.no_grad():
        recon, ids, _ = tok(x, bases)
        torch.testing.assert_close(tok.decode_indices(ids), recon, atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_on_every_token_and_decreases():
    tok, gen, method = tiny_pair()
    ids = torch.randint(0, 16, (4, gen.cfg.seq_len))
    cond = torch.tensor([0, 1, 2, 0])
    gen.train()
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    loss0, parts = method.loss(gen, ids, cond, tok)
    with torch.no_grad():
        logits = gen(tok.teacher_inputs(ids), cond)
        manual = -torch.log_softmax(logits, -1).gather(-1, ids[..., None]).mean()
    torch.testing.assert_close(loss0, manual, atol=1e-5, rtol=1e-5)
    assert set(parts) == {f"nll/map_{m}" for m in range(5)}
    for _ in range(30):
        loss, _ = method.loss(gen, ids, cond, tok)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * loss0.item()


def test_bases_from_a_decomposition_rebuild_the_image():
    """B_1 + D_1 = I (seed eq. 10) for the bases the loader derives from an AT decomposition."""
    from coarse2fine.preprocess.mumford_shah import ATParams, decompose
    from coarse2fine.train.data import bases_from_decomposition

    rng = np.random.default_rng(0)
    img = np.clip(np.kron(rng.random((3, 4, 4)), np.ones((1, 4, 4))) + 0.05 * rng.standard_normal((3, 16, 16)), 0, 1)
    d = decompose(img, 3, ATParams(max_outer=3))
    cols = {"base": d.base[None]} | {f"detail_{j}": d.details[j - 1][None] for j in (1, 2, 3)}
    bases = bases_from_decomposition(cols, 3, 3)[0]  # (3, 3, 16, 16): B_1, B_2, B_3
    np.testing.assert_allclose(bases[0] + d.details[0], img, atol=1e-5)
    np.testing.assert_allclose(bases[2], d.base, atol=1e-6)
    assert bases_from_decomposition(cols, 3, 1).shape == (1, 1, 3, 16, 16)  # an order-3 dataset serves order 1


def _dataset(uri: Path, keys: list[str], order: int | None = None) -> str:
    import pyarrow as pa

    from coarse2fine.preprocess import storage

    uri.mkdir(parents=True)
    table = pa.table({"key": keys})
    shard = storage.write_shard(str(uri), "part-0.parquet", table)
    storage.write_manifest(str(uri), stage="x", fp=uri.name, config={} if order is None else {"order": order},
                           inputs={}, shards=[shard], code="test")
    return str(uri)


def test_the_join_refuses_a_decomposition_of_other_images(tmp_path):
    from coarse2fine.train.data import check_decomposition

    images = _dataset(tmp_path / "images", ["a", "b", "c"])
    check_decomposition(images, _dataset(tmp_path / "ok", ["c", "b", "a", "z"], 3), 3)
    with pytest.raises(UserValueError, match=r"no row for 1 of the 3 images .* re-run `c2f preprocess`") as e:
        check_decomposition(images, _dataset(tmp_path / "other", ["a", "b", "y"], 3), 2)
    assert "\n" not in str(e.value)
    with pytest.raises(UserValueError, match="has order 2: set preprocess.decomposition.order >= 3"):
        check_decomposition(images, _dataset(tmp_path / "low", ["a", "b", "c"], 2), 3)


@pytest.mark.slow
def test_cart_trains_tokenizes_generates_and_evaluates_through_the_cli(tmp_path, capsys):
    import mlflow
    import ray

    from coarse2fine.pipelines.cli import main
    from coarse2fine.preprocess import schema

    sets = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.source={tmp_path}/imgs",
            "--set", f"storage.root={tmp_path}/store", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", "tokenizer.method=cart", "--set", "generator.method=cart"]
    try:
        assert main(["demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]) == 0
        assert main(["train-tokenizer", *sets, "--set", "tokenizer.cart.order=3"]) == 2  # tiny data has order 2
        assert "set preprocess.decomposition.order >= 3" in " ".join(capsys.readouterr().err.split())
        assert main(["train-generator", *sets]) == 0
        run_id = capsys.readouterr().out.split("generator run ")[1].split()[0]
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        tags = mlflow.get_run(run_id).data.tags
        assert tags["c2f.method"] == "cart" and tags["c2f.tokenizer_method"] == "cart"
        tok_tags = mlflow.get_run(tags["c2f.tokenizer_run"]).data.tags
        assert "/decomposition/" in tok_tags["c2f.decomposition"]
        tokens = schema.read_table(tags["c2f.tokens"])
        layout = schema.read_manifest(tags["c2f.tokens"])["config"]["layout"]
        assert [c["name"] for c in layout] == ["base_0", "base_1", "base_2", "detail_2_1", "detail_1_1"]
        assert tokens.num_rows == 12 and schema.tensor_numpy(tokens.column("detail_1_1")).shape == (12, 4, 4)
        # the tokens are the tokenizer's ids of image ⋈ decomposition (Beam join = in-memory join)
        from coarse2fine.train.checkpoints import load_model
        from coarse2fine.train.data import load_bases

        method, model = load_model(tok_tags["c2f.checkpoint"], "cpu", "tokenizer")
        images = schema.read_table(tok_tags["c2f.images"]).sort_by("key").slice(0, 3)
        keys = images.column("key").to_pylist()
        x = torch.from_numpy(np.stack([schema.decode_image(b) for b in images.column("image").to_pylist()]))
        want = method.encode(model, x, load_bases(tok_tags["c2f.decomposition"], keys, 2))
        got = tokens.sort_by("key").slice(0, 3)
        for c in layout:
            assert np.array_equal(schema.tensor_numpy(got.column(c["name"])), want[c["name"]])
        grid = tmp_path / "g.png"
        assert main(["generate", "--run", run_id, "--n", "2", "--class", "0", "--out", str(grid), *sets]) == 0
        assert_sample_grid(grid, 2, 32)
        assert main(["evaluate", "--run", tags["c2f.tokenizer_run"], *sets]) == 0
        assert "eval/psnr_32px" in mlflow.get_run(tags["c2f.tokenizer_run"]).data.metrics
        assert main(["evaluate", "--run", run_id, *sets]) == 0
        metrics = mlflow.get_run(run_id).data.metrics
        assert "eval/fid_maps5" in metrics and metrics["eval/images_per_s_maps5"] > 0
    finally:
        ray.shutdown()
