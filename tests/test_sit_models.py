"""SIT / ViT-VQGAN models: DWT module, scale-causality, codebooks, partial decoding, overfitting."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

from coarse2fine.preprocess.dwt import haar_dwt as np_haar_dwt
from coarse2fine.train.kernels.haar import haar_dwt, haar_idwt
from coarse2fine.train.models.quantizer import FactorizedVQ
from coarse2fine.train.models.sit import SITConfig, build_tokenizer, patchify, unpatchify


def model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tokenizer(SITConfig(resolution=32, num_scales=3, tokens_per_scale=4, size="tiny",
                                     codebook_size=64, **kw)).eval()


def test_torch_dwt_equals_pywavelets_and_preprocess_layout():
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ours = haar_dwt(x, 3)
    for b in range(2):
        ref = np_haar_dwt(x[b].numpy(), 3)
        for o, r in zip(ours, ref):
            np.testing.assert_allclose(o[b].numpy(), r, atol=1e-12)
    coeffs = pywt.wavedec2(x.numpy(), "haar", level=3, axes=(-2, -1))
    np.testing.assert_allclose(ours[0].numpy(), coeffs[0], atol=1e-12)


def test_torch_idwt_inverts_and_is_differentiable():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(haar_idwt(haar_dwt(x, 2)), x)
    assert torch.autograd.gradcheck(lambda t: haar_dwt(t, 2)[1].sum() + haar_dwt(t, 2)[2].pow(2).sum(), (x,))


def test_patchify_round_trip():
    c = torch.randn(2, 9, 8, 8)
    p = patchify(c, grid=2)
    assert p.shape == (2, 4, 9 * 16)
    torch.testing.assert_close(unpatchify(p, 9, 2), c)


@pytest.mark.parametrize("per_scale_params", [True, False])
def test_scale_causal_encoder_and_decoder(per_scale_params):
    shared = dict(enc_per_scale_params=per_scale_params, dec_per_scale_params=per_scale_params)
    m = model(**shared)
    scales = m.image_to_scales(torch.rand(2, 3, 32, 32))
    z = m.encode_scales(scales)
    bumped = [c.clone() for c in scales]
    bumped[2] += torch.randn_like(bumped[2])  # perturb scale 3's input tokens
    z2 = m.encode_scales(bumped)
    assert torch.equal(z[:, :2], z2[:, :2]) and not torch.allclose(z[:, 2], z2[:, 2])
    q = torch.randn(2, 3, 4, 32)
    out = m.decode(q)
    q2 = q.clone()
    q2[:, 2] += torch.randn_like(q2[:, 2])  # not a constant: LayerNorm would remove that
    out2 = m.decode(q2)
    assert all(torch.equal(a, b) for a, b in zip(out[:2], out2[:2])) and not torch.allclose(out[2], out2[2])
    # dense attention does not have that property
    dense = model(**shared, causal_encoder=False, causal_decoder=False)
    assert not torch.allclose(dense.encode_scales(scales)[:, 0], dense.encode_scales(bumped)[:, 0])
    assert not torch.allclose(dense.decode(q)[0], dense.decode(q2)[0])


def test_per_scale_codebooks_embed_the_same_id_differently():
    idx = torch.full((1, 3, 4), 5)
    per_scale = model().quantizer.indices_to_codes(idx)
    assert not torch.allclose(per_scale[0, 0], per_scale[0, 1])
    shared = model(per_scale_codebooks=False).quantizer.indices_to_codes(idx)
    torch.testing.assert_close(shared[0, 0], shared[0, 1])


def test_scd_shares_the_decoders_transformer_and_keeps_the_encoders_per_scale():
    """SIT-SCD (seed §5.3): per-scale encoder parameters, one set of decoder parameters for all
    scales. Counted from first principles: per scale (seed §4.1: "key, query, value embeddings, the
    layer norms, and the MLP") a pre-norm block has 2 LayerNorms (2·2C), qkv (3C²+3C) and a 4C MLP
    (8C²+5C), and the stack a final LayerNorm (2C); the attention output projection (C²+C) is one."""
    C, S, depth = 32, 3, 1  # "tiny"

    def count_for(groups):
        return depth * (groups * (4 * C + 3 * C * C + 3 * C + 8 * C * C + 5 * C) + C * C + C) + groups * 2 * C

    def count(module):
        return sum(p.numel() for p in module.parameters())

    scd = model(causal_encoder=False, enc_per_scale_params=True, dec_per_scale_params=False)
    assert count(scd.encoder) == count_for(S) and count(scd.decoder) == count_for(1)
    sce = model(causal_decoder=False, enc_per_scale_params=False, dec_per_scale_params=True)
    assert count(sce.encoder) == count_for(1) and count(sce.decoder) == count_for(S)
    # sharing changes the parameter count only, not what a scale-causal decoder can do
    q = torch.randn(2, S, 4, C)
    assert [c.shape for c in model(dec_per_scale_params=False).decode(q[:, :2])] == [(2, 3, 8, 8), (2, 9, 8, 8)]


@pytest.mark.parametrize("num_codebooks", [1, 3])
def test_quantizer_round_trip_and_straight_through(num_codebooks):
    torch.manual_seed(0)
    vq = FactorizedVQ(dim=16, codebook_size=32, code_dim=8, num_codebooks=num_codebooks)
    z = torch.randn(4, 3, 5, 16, requires_grad=True)
    q, idx, aux = vq(z)
    assert q.shape == z.shape and idx.shape == (4, 3, 5) and idx.dtype == torch.long and aux.ndim == 0
    torch.testing.assert_close(vq.indices_to_codes(idx), q)
    (q.sum() + aux).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # gradients pass the straight-through estimator
    assert vq.codebook.grad.abs().sum() > 0


def test_nearest_code_under_bf16_autocast_is_the_fp64_argmax():
    """Under bf16 autocast the code choice must still be the exact nearest code of the projected
    feature (computed here in fp64 by hand): bf16 similarities pick another code for near ties."""
    torch.manual_seed(0)
    vq = FactorizedVQ(dim=64, codebook_size=1024, code_dim=32, num_codebooks=1)
    z = torch.randn(8, 1, 256, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx, _ = vq(z)
    w, b = vq.proj_in.weight.detach().double()[0], vq.proj_in.bias.detach().double()[0]  # (in, d), (d,)
    z64 = torch.nn.functional.normalize(z.double() @ w + b, dim=-1)  # (B, 1, N, d)
    codes64 = torch.nn.functional.normalize(vq.codebook.detach().double()[0], dim=-1)  # (K, d)
    assert torch.equal(idx, (z64 @ codes64.T).argmax(-1))


def test_entropy_terms_have_the_right_sign():
    vq = FactorizedVQ(dim=8, codebook_size=16, code_dim=8, entropy_weight=1.0)
    _, _, _, terms = vq(torch.randn(2, 1, 64, 8), return_terms=True)
    assert 0 <= terms["token_entropy"] <= np.log(16) + 1e-5
    assert 0 <= terms["codebook_entropy"] <= np.log(16) + 1e-5


@pytest.mark.parametrize("num_codebooks, groups", [(1, 1), (1, 3), (3, 3)])
def test_nearest_code_is_the_brute_force_argmin_of_unit_vectors(num_codebooks, groups):
    """Each index is the argmin over codes of ‖ẑ − ê_k‖ (unit vectors: ẑ the l2-normalised
    projection, ê_k the l2-normalised codebook of the token's group), by a loop over tokens; a
    farthest-code search or a wrong group's codebook fails it."""
    torch.manual_seed(1)
    vq = FactorizedVQ(dim=12, codebook_size=24, code_dim=6, num_codebooks=num_codebooks)
    z = torch.randn(3, groups, 7, 12)
    _, idx, _ = vq(z)
    with torch.no_grad():
        z_hat = torch.nn.functional.normalize(vq.proj_in(z) if num_codebooks > 1 else
                                              vq.proj_in(z.reshape(3, 1, groups * 7, 12)).reshape(3, groups, 7, -1), dim=-1)
        for b, g, n in np.ndindex(3, groups, 7):
            codes = torch.nn.functional.normalize(vq.codebook[g if num_codebooks > 1 else 0], dim=-1)  # (K, d)
            expected = int(((z_hat[b, g, n] - codes) ** 2).sum(-1).argmin())
            assert idx[b, g, n] == expected, (b, g, n)


def test_entropy_terms_equal_a_direct_computation():
    """Per-token entropy (mean over tokens) and codebook entropy (entropy of the assignment
    averaged over batch and tokens, per codebook, then averaged over codebooks), computed directly
    from d_k = softmax(−‖ẑ − ê_k‖² / τ) with explicit loops; a wrongly averaged term fails it."""
    torch.manual_seed(2)
    vq = FactorizedVQ(dim=5, codebook_size=4, code_dim=3, num_codebooks=2, entropy_temperature=0.5)
    z = torch.randn(2, 2, 3, 5)
    _, _, _, terms = vq(z, return_terms=True)
    with torch.no_grad():
        z_hat = torch.nn.functional.normalize(vq.proj_in(z), dim=-1)
        token_h, code_h = [], []
        for g in range(2):
            codes = torch.nn.functional.normalize(vq.codebook[g], dim=-1)
            avg = torch.zeros(4, dtype=torch.float64)
            for b, n in np.ndindex(2, 3):
                d = torch.tensor([-float(((z_hat[b, g, n] - codes[k]) ** 2).sum()) / 0.5 for k in range(4)],
                                 dtype=torch.float64).softmax(0)
                token_h.append(float(-(d * d.log()).sum()))
                avg += d / 6
            code_h.append(float(-(avg * avg.log()).sum()))
    assert float(terms["token_entropy"]) == pytest.approx(np.mean(token_h), rel=1e-5)
    assert float(terms["codebook_entropy"]) == pytest.approx(np.mean(code_h), rel=1e-5)


def test_partial_decoding_is_the_coarse_image():
    m = model()
    idx = torch.randint(0, 64, (2, 3, 4))
    q = m.quantizer.indices_to_codes(idx)
    full = m.decode(q)
    for s in (1, 2):
        part_img = m.decode_indices(idx[:, :s])  # native resolution of s scales
        assert part_img.shape[-1] == 32 >> (3 - s)
        zeroed = m.scales_to_image(full[:s] + [torch.zeros_like(c) for c in full[s:]])  # full resolution
        torch.testing.assert_close(F.avg_pool2d(zeroed, 2 ** (3 - s)), part_img, rtol=1e-5, atol=1e-5)


def test_low_resolution_input_is_encoded_natively_with_the_first_scales():
    m = model()
    x = torch.rand(2, 3, 32, 32)
    _, idx_full, _ = m.encode(x)
    _, idx_low, _ = m.encode(F.avg_pool2d(x, 2))
    assert idx_low.shape == (2, 2, 4)
    assert (idx_low == idx_full[:, :2]).float().mean() > 0.9  # equal up to float rounding at ties
    dense = model(causal_encoder=False)
    with pytest.raises(ValueError, match="scale-causal"):
        dense.encode(F.avg_pool2d(x, 2))


def test_baseline_is_pixel_vit_with_one_codebook():
    torch.manual_seed(0)
    vit = build_tokenizer(SITConfig(resolution=32, num_scales=1, tokens_per_scale=16, size="tiny", codebook_size=64))
    recon, idx, losses = vit(torch.rand(2, 3, 32, 32))
    assert recon.shape == (2, 3, 32, 32) and idx.shape == (2, 1, 16)
    assert vit.cfg.patch_dim(0) == 3 * 8 * 8


@pytest.mark.parametrize("kw, msg", [({"tokens_per_scale": 5}, "square"), ({"size": "huge"}, "unknown model size"),
                                     ({"resolution": 36}, "not divisible")])
def test_config_validation(kw, msg):
    base = dict(resolution=32, num_scales=3, tokens_per_scale=4)
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        SITConfig(**base)


def test_tiny_sit_overfits_16_demo_images():
    """Honest threshold from a measured run: 8 dB untrained → ~23 dB after 300 steps (≈8 s on 2 cores)."""
    from coarse2fine.evaluate.metrics import reconstruction_metrics
    from coarse2fine.preprocess.demo_data import demo_crops
    from coarse2fine.train.losses import LossWeights
    from coarse2fine.train import methods
    from coarse2fine.train.methods.base import usage_groups
    from coarse2fine.train.steps import to_floats, tokenizer_eval_step, tokenizer_train_step, warmup_cosine

    torch.manual_seed(0)
    x = torch.from_numpy(np.stack([np.asarray(c, np.float32) / 255 for _, c in demo_crops(16, 32, 0)]))
    x = x.permute(0, 3, 1, 2).contiguous()  # (16, 3, 32, 32)
    m = build_tokenizer(SITConfig(resolution=32, num_scales=3, tokens_per_scale=16, size="mini", codebook_size=256))

    def psnr() -> float:
        return reconstruction_metrics(tokenizer_eval_step(m, x)[0], x)["psnr"].mean().item()

    before = psnr()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(300))
    groups = usage_groups(methods.tokenizer("sit").layout(m.cfg))
    for _ in range(300):
        metrics = to_floats(tokenizer_train_step(m, opt, sched, x, LossWeights(), groups=groups))
    assert 0 < metrics["batch_usage/scale_2"] <= 1
    after = psnr()
    assert np.isfinite(metrics["loss"])
    assert after > 20.0 and after > before + 10.0, (before, after)


def test_adversarial_step_with_spectral_normalised_discriminator():
    from coarse2fine.train.losses import LossWeights
    from coarse2fine.train.models.discriminator import PatchDiscriminator
    from coarse2fine.train.steps import to_floats, tokenizer_train_step, warmup_cosine

    torch.manual_seed(0)
    m = model()
    disc = PatchDiscriminator(channels=16, layers=2)
    x = torch.rand(4, 3, 32, 32)
    disc(x)  # one forward runs the power iteration
    w = disc.net[0].weight.detach()  # the spectrally normalised weight
    assert float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)) == pytest.approx(1.0, abs=0.05)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10))
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    weights = LossWeights(adversarial=0.1, adversarial_start=1)
    last = [proj.weight for proj in m.patch_out]
    before = to_floats(tokenizer_train_step(m, opt, sched, x, weights, step=0, disc=disc, disc_optimizer=d_opt,
                                            last_layer=last))
    assert "g_adv" not in before  # not yet started
    d_before = [p.detach().clone() for p in disc.parameters()]
    after = to_floats(tokenizer_train_step(m, opt, sched, x, weights, step=1, disc=disc, disc_optimizer=d_opt,
                                           last_layer=last))
    assert np.isfinite(after["g_adv"]) and np.isfinite(after["d_loss"]) and after["d_loss"] >= 0
    assert np.isfinite(after["adaptive_weight"]) and after["adaptive_weight"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))


@pytest.mark.parametrize("enc, dec", [(True, False), (False, True)], ids=["SIT-SCE", "SIT-SCD"])
def test_encoder_only_or_decoder_only_scale_causal(enc, dec):
    m = model(causal_encoder=enc, causal_decoder=dec)
    scales = m.image_to_scales(torch.rand(2, 3, 32, 32))
    bumped = [c.clone() for c in scales]
    bumped[2] += torch.randn_like(bumped[2])
    enc_kept = torch.equal(m.encode_scales(scales)[:, :2], m.encode_scales(bumped)[:, :2])
    q = torch.randn(2, 3, 4, 32)
    q2 = q.clone()
    q2[:, 2] += torch.randn_like(q2[:, 2])
    dec_kept = all(torch.equal(a, b) for a, b in zip(m.decode(q)[:2], m.decode(q2)[:2]))
    assert (enc_kept, dec_kept) == (enc, dec)
    # only the scale-causal side accepts partial sequences
    if dec:
        assert m.decode(q[:, :2])[1].shape == m.decode(q)[1].shape
    else:
        with pytest.raises(ValueError, match="scale-causal decoder"):
            m.decode(q[:, :2])


def test_entropy_weight_switches_the_entropy_terms():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 8, 16)
    off = FactorizedVQ(16, 32, 8, num_codebooks=3, entropy_weight=0.0)
    on = FactorizedVQ(16, 32, 8, num_codebooks=3, entropy_weight=0.002)
    on.load_state_dict(off.state_dict())
    _, _, aux_off, t = off(z, return_terms=True)
    _, _, aux_on = on(z)
    torch.testing.assert_close(aux_off, t["codebook"] + 0.25 * t["commitment"])
    torch.testing.assert_close(aux_on - aux_off, 0.002 * (t["token_entropy"] - t["codebook_entropy"]))


@pytest.mark.parametrize("seed", range(3))
def test_codes_used_counts_distinct_ids_and_metrics_convert_in_one_copy(seed):
    """``codes_used`` against a Python set of the ids; ``to_floats`` keeps every value and key."""
    from coarse2fine.train.steps import codes_used, to_floats

    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(seed))
    assert int(codes_used(ids, 64)) == len(set(ids.flatten().tolist()))
    out = to_floats({"a": torch.tensor(0.1, dtype=torch.float64), "b": 2, "c": torch.tensor([[0.25]]),
                     "d": codes_used(ids, 64) / 64})
    assert out == {"a": 0.1, "b": 2.0, "c": 0.25, "d": len(set(ids.flatten().tolist())) / 64}  # float64 kept
    assert all(type(v) is float for v in out.values())


@pytest.mark.gpu
def test_to_floats_takes_metrics_from_several_devices():
    """FAR's level and the fixed adaptive weight are CPU scalars beside CUDA losses."""
    from coarse2fine.train.steps import to_floats

    assert to_floats({"a": torch.tensor(1.5, device="cuda"), "b": torch.tensor(2.5), "c": 3}) == {
        "a": 1.5, "b": 2.5, "c": 3.0}


def test_a_shared_codebook_folds_the_scales_into_one_group_with_its_loss_terms():
    """num_codebooks = 1 over 3 scales (SIT's shared codebook): the same as quantizing the scales'
    tokens as one group of 3N, terms included, reshaped back per scale."""
    torch.manual_seed(0)
    vq = FactorizedVQ(dim=8, codebook_size=16, code_dim=4, num_codebooks=1)
    z = torch.randn(2, 3, 5, 8)  # (B, S, N, C)
    q, idx, aux, terms = vq(z, return_terms=True)
    q1, idx1, aux1, terms1 = vq(z.reshape(2, 1, 15, 8), return_terms=True)
    assert q.shape == (2, 3, 5, 8) and idx.shape == (2, 3, 5)
    assert torch.equal(q, q1.reshape(2, 3, 5, 8)) and torch.equal(idx, idx1.reshape(2, 3, 5))
    assert torch.equal(aux, aux1) and terms.keys() == terms1.keys() == {
        "codebook", "commitment", "token_entropy", "codebook_entropy"}
    assert all(torch.equal(terms[k], terms1[k]) for k in terms)
