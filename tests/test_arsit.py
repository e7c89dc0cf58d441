"""AR-SIT: KV cache, causality, prefixes, CFG, condition dropout, and that a tiny model learns."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from coarse2fine.train import methods
from coarse2fine.train.generate import SampleSettings, decode, edit, encode_prefix, generate, upsample
from coarse2fine.train.models.arsit import ARSITConfig, build_generator
from coarse2fine.train.models.sit import SITConfig, build_tokenizer
from coarse2fine.train.sampling import filter_logits, guided_logits, sample_tokens
from coarse2fine.train.steps import drop_condition, generator_train_step, to_floats, warmup_cosine

LOSS = methods.generator("ar_sit").loss

S, N, V, C = 3, 4, 16, 3


def model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator(ARSITConfig(S, N, V, num_classes=C, **kw)).double().eval()


def pair():
    torch.manual_seed(1)
    tok = build_tokenizer(SITConfig(resolution=32, num_scales=S, tokens_per_scale=N, codebook_size=V, size="tiny")).eval()
    return model(), tok


@pytest.mark.parametrize("guidance,top_k,top_p", [(1.0, 0, 1.0), (3.0, 5, 1.0), (2.0, 0, 0.8)])
def test_kv_cache_gives_the_same_tokens(guidance, top_k, top_p):
    m, cond = model(), torch.tensor([0, 1, 2, C])
    runs = [sample_tokens(m, cond, S * N, guidance=guidance, top_k=top_k, top_p=top_p,
                          generator=torch.Generator().manual_seed(7), use_cache=cache) for cache in (True, False)]
    assert torch.equal(*runs)
    # and the cached per-step logits equal teacher forcing on the finished sequence
    ids, cache, full = runs[0], m.new_cache(len(cond)), m(runs[0], cond)
    for t in range(S * N):
        torch.testing.assert_close(m.next_logits(ids[:, :t], cond, cache), full[:, t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_tokens, prefix", [(1, 0), (2, 0), (N + 1, 0), (N + 1, 2), (2 * N, N)])
def test_early_stops_size_the_cache_to_their_tokens_and_sample_as_the_reference(num_tokens, prefix):
    m, cond = model(), torch.tensor([1, C])
    pre = torch.randint(0, V, (2, prefix))
    runs = [sample_tokens(m, cond, num_tokens, pre, guidance=2.0, generator=torch.Generator().manual_seed(5),
                          use_cache=cache) for cache in (True, False)]
    assert torch.equal(*runs) and runs[0].shape == (2, num_tokens)


@pytest.mark.parametrize("prefix", [0, 1, N + 1])
def test_decode_steps_equal_teacher_forcing(prefix):
    """The static cache's one-token step (tensor position, whole-buffer attention under a mask) gives
    the logits of the uncached model at every later position, after a prefill of any length."""
    m, cond = model(), torch.tensor([0, 1, C])
    ids = torch.randint(0, V, (3, S * N))
    full = m(ids, cond)  # (3, L, V)
    cache = m.new_cache(len(cond))
    torch.testing.assert_close(m.next_logits(ids[:, :prefix], cond, cache), full[:, prefix], rtol=1e-9, atol=1e-9)
    assert cache.length == prefix + 1
    for t in range(prefix + 1, S * N):
        logits = m.decode_step(ids[:, t - 1: t], torch.tensor([t]), cache)
        cache.length = t + 1
        torch.testing.assert_close(logits, full[:, t], rtol=1e-9, atol=1e-9)


def test_stale_keys_in_the_static_cache_are_never_read():
    """Garbage written ahead of the sequence (as a CUDA graph's warm-up writes position 1) changes nothing."""
    m, cond = model(), torch.tensor([2, C])
    ids = torch.randint(0, V, (2, S * N))
    cache = m.new_cache(len(cond))
    cache.k_LBhMd.normal_()
    cache.v_LBhMd.normal_()
    m.next_logits(ids[:, :0], cond, cache)
    for t in range(1, S * N):
        torch.testing.assert_close(m.decode_step(ids[:, t - 1: t], torch.tensor([t]), cache), m(ids, cond)[:, t],
                                   rtol=1e-9, atol=1e-9)
        cache.length = t + 1


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_logits_and_greedy_tokens():
    """Fused code rounds differently, so: logits within fp32 tolerance at every position, and the
    same greedy (top-1) sequence, where a last-bit difference cannot flip a draw."""
    m, cond = model().float(), torch.tensor([0, 3, C])
    ids = torch.randint(0, V, (3, S * N))
    compiled = torch.compile(m.decode_step, fullgraph=True, dynamic=False)
    eager_cache, compiled_cache = m.new_cache(3), m.new_cache(3)
    with torch.no_grad():  # as sample_tokens: a step writes its cache in place
        m.next_logits(ids[:, :0], cond, eager_cache)
        m.next_logits(ids[:, :0], cond, compiled_cache)
        for t in range(1, S * N):
            pos, last = torch.tensor([t]), ids[:, t - 1: t]
            torch.testing.assert_close(compiled(last, pos, compiled_cache), m.decode_step(last, pos, eager_cache),
                                       rtol=1e-5, atol=1e-5)
    runs = [sample_tokens(m, cond, S * N, guidance=2.0, top_k=1, compile_step=c) for c in (False, True)]
    assert torch.equal(*runs)


def test_logits_at_t_ignore_later_tokens():
    m, cond = model(), torch.tensor([1, 2])
    ids = torch.randint(0, V, (2, S * N))
    base = m(ids, cond)
    for t in range(S * N):
        changed = ids.clone()
        changed[:, t:] = torch.randint(0, V, changed[:, t:].shape)
        torch.testing.assert_close(m(changed, cond)[:, : t + 1], base[:, : t + 1])
        if t + 1 < S * N and not torch.equal(changed[:, t], ids[:, t]):
            assert not torch.allclose(m(changed, cond)[:, t + 1:], base[:, t + 1:])


def test_same_id_means_different_things_per_scale():
    m = model()
    ids = torch.zeros(1, S * N, dtype=torch.long)  # id 0 at every scale
    emb = m._embed_tokens(ids, torch.arange(S * N))[0]  # (L, C)
    assert not torch.allclose(emb[0], emb[N]) and not torch.allclose(emb[N], emb[2 * N])
    assert torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("use_cache", [True, False])
def test_prefix_is_never_altered(use_cache):
    m, cond = model(), torch.tensor([0, 2, C])
    prefix = torch.randint(0, V, (3, N + 1))  # ends mid-scale on purpose
    out = sample_tokens(m, cond, S * N, prefix, guidance=2.0, generator=torch.Generator().manual_seed(0),
                        use_cache=use_cache)
    assert torch.equal(out[:, : N + 1], prefix) and out.shape == (3, S * N)


def test_a_complete_prefix_comes_back_unchanged_and_a_longer_one_is_refused():
    m, cond = model(), torch.tensor([0, 1])
    prefix = torch.randint(0, V, (2, 2 * N))
    assert torch.equal(sample_tokens(m, cond, 2 * N, prefix), prefix)
    with pytest.raises(AssertionError, match="prefix longer"):
        sample_tokens(m, cond, 2 * N - 1, prefix)


def test_sampling_builds_no_autograd_graph():
    """Every forward pass of the generator during sampling runs with gradients off (memory)."""
    m, modes = model(), []
    m.blocks[0].register_forward_pre_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    with torch.enable_grad():
        sample_tokens(m.train(), torch.tensor([0]), S * N, guidance=2.0)
        assert torch.is_grad_enabled()  # the caller's mode is restored
    assert len(modes) == S * N and not any(modes)  # one cached pass per token


def test_upsample_and_edit_keep_the_given_scales():
    gen, tok = pair()
    x = torch.rand(2, 3, 32, 32)
    cond, st = torch.tensor([0, 1]), SampleSettings(guidance=2.0)
    low = torch.nn.functional.avg_pool2d(x, 2)  # 16px: the first two scales
    ids, images = upsample(gen, tok, low, cond, st, seed=0)
    assert torch.equal(ids[:, : 2 * N], encode_prefix(tok, low)) and images.shape == (2, 3, 32, 32)
    ids, _ = edit(gen, tok, x, 1, cond, st, seed=0)
    assert torch.equal(ids[:, :N], encode_prefix(tok, x, 1))
    # scale-causal encoder: the kept coarse tokens of the full image are those of its 2^k average
    assert torch.equal(encode_prefix(tok, x, 2), encode_prefix(tok, low))


def test_early_stop_decodes_a_coarse_image_and_is_a_prefix_of_the_full_sample():
    gen, tok = pair()
    cond = torch.tensor([0, 1, 2])
    coarse_ids, coarse = generate(gen, tok, cond, 1, SampleSettings(), seed=3)
    full_ids, full = generate(gen, tok, cond, None, SampleSettings(), seed=3)
    assert coarse.shape == (3, 3, 8, 8) and full.shape == (3, 3, 32, 32)
    assert torch.equal(full_ids[:, :N], coarse_ids)
    torch.testing.assert_close(decode(tok, coarse_ids), coarse)
    with pytest.raises(ValueError, match="stop scale"):
        generate(gen, tok, cond, S + 1, SampleSettings(), seed=0)


def test_dense_tokenizers_are_refused_where_scale_causality_is_needed():
    gen, _ = pair()
    dense = build_tokenizer(SITConfig(resolution=32, num_scales=S, tokens_per_scale=N, codebook_size=V,
                                      causal_encoder=False, causal_decoder=False)).eval()
    with pytest.raises(ValueError, match="scale-causal encoder"):
        encode_prefix(dense, torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="scale-causal decoder"):
        generate(gen, dense, torch.tensor([0]), 1, SampleSettings(), seed=0)


def test_cfg_scale_one_is_the_conditional_model():
    m, cond = model(), torch.tensor([0, 1, 2])
    ids = torch.randint(0, V, (3, 5))
    c = m.next_logits(ids, cond)
    u = m.next_logits(ids, torch.full_like(cond, C))
    torch.testing.assert_close(guided_logits(c, u, 1.0), c)
    assert not torch.allclose(guided_logits(c, u, 3.0), c)
    # sampling with guidance exactly 1 runs no unconditional pass and equals plain conditional sampling
    a = sample_tokens(m, cond, S * N, guidance=1.0, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(3, 0, dtype=torch.long)
    for _ in range(S * N):
        ids = torch.cat([ids, torch.multinomial(m.next_logits(ids, cond).softmax(-1), 1, generator=g)], 1)
    assert torch.equal(a, ids)


def test_null_class_rate_in_training():
    labels = torch.zeros(200_000, dtype=torch.long)
    dropped = drop_condition(labels, C, 0.1, torch.Generator().manual_seed(0))
    rate = (dropped == C).float().mean().item()
    assert abs(rate - 0.1) < 0.004  # 6 sigma of a binomial(200k, 0.1)
    assert set(dropped.unique().tolist()) == {0, C}
    assert model().cfg.cond_drop_prob == 0.1  # the seed's / Parti's default


@pytest.mark.parametrize("prob", [0.0, 0.1, 0.5])
def test_training_step_feeds_the_null_class_at_the_configured_rate(prob):
    """What reaches the class embedding in a real training step, not just the helper."""
    m = model(cond_drop_prob=prob).train()
    seen = []
    m.cls_emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    torch.manual_seed(3)
    B = 4000
    generator_train_step(m, opt, sched, torch.randint(0, V, (B, S * N)), torch.ones(B, dtype=torch.long), LOSS)
    (classes,) = seen
    assert set(classes.unique().tolist()) <= {1, C}
    rate = (classes == C).double().mean().item()
    assert abs(rate - prob) <= 6 * math.sqrt(prob * (1 - prob) / B)  # 6 sigma of a binomial(B, prob)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, V), p=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_top_k_top_p_keep_the_most_likely_tokens(k, p, seed):
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(filter_logits(logits, top_k=k))
    assert (kept.sum(-1) == k).all()
    kept_p = torch.isfinite(filter_logits(logits, top_p=p))
    probs = logits.softmax(-1)
    for b in range(2):
        mass = probs[b][kept_p[b]].sum()
        assert mass >= p - 1e-6  # enough mass…
        assert mass - probs[b][kept_p[b]].min() < p + 1e-6  # …and minimal: dropping the least likely falls short
        dropped = probs[b][~kept_p[b]]
        assert dropped.numel() == 0 or probs[b][kept_p[b]].min() >= dropped.max()


def test_exponential_schedule_reaches_its_final_fraction():
    f = warmup_cosine(100, 0.1, "exponential", 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.01) and f(55) == pytest.approx(0.1)


def test_a_tiny_model_learns_its_sequences_on_cpu():
    """Four class-labelled sequences: per-token NLL falls far below chance (ln V) and top-1
    sampling under each class reproduces its sequence."""
    torch.manual_seed(0)
    m = build_generator(ARSITConfig(S, N, V, num_classes=4, size="tiny", cond_drop_prob=0.1))
    data = torch.randint(0, V, (4, S * N))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(300, 0.05))
    first = to_floats(generator_train_step(m, opt, sched, data, labels, LOSS))["loss"]
    for _ in range(299):
        last = to_floats(generator_train_step(m, opt, sched, data, labels, LOSS))
    assert first > 0.8 * math.log(V) and last["loss"] < 0.1 * math.log(V)
    assert all(k in last for k in ("nll/scale_0", "nll/scale_2", "grad_norm", "lr"))
    out = sample_tokens(m, labels, S * N, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, data)


def tiny_images_dataset(folder, n: int = 6, side: int = 32) -> str:
    """A complete ``images`` dataset written by hand (one shard and its manifest): no Beam needed."""
    import io
    import json

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from coarse2fine.preprocess import schema

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(png, format="PNG")
        rows.append({"key": f"k{i}", "source_uri": f"mem://{i}", "split": "validation" if i % 2 else "train",
                     "width": side, "height": side, "label": i % C, "image": png.getvalue()})
    folder.mkdir()
    pq.write_table(schema.table_from_rows(rows, schema.IMAGES), folder / "part-00000.parquet")
    manifest = {"fingerprint": "hand-written", "shards": [{"name": "part-00000.parquet"}]}
    (folder / schema.MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


@pytest.mark.parametrize("enc, dec", [(True, True), (True, False), (False, True)], ids=["SIT-SC", "SIT-SCE", "SIT-SCD"])
def test_evaluation_runs_the_rows_each_tokenizer_supports_and_names_the_rest(enc, dec, tmp_path):
    """SIT seed §5.3–5.4: stop scales need a scale-causal decoder, upsampling a scale-causal encoder.
    Without the decoder the rows are the seed's baseline treatment (full-resolution samples
    block-averaged); nothing raises, and what does not apply is named."""
    from coarse2fine.evaluate.config import EvaluateConfig
    from coarse2fine.train.checkpoints import Pair

    torch.manual_seed(1)
    tok = build_tokenizer(SITConfig(resolution=32, num_scales=S, tokens_per_scale=N, codebook_size=V, size="tiny",
                                    causal_encoder=enc, causal_decoder=dec)).eval()
    gen = build_generator(ARSITConfig(S, N, V, num_classes=C)).eval()
    pair = Pair(methods.generator("ar_sit"), gen, methods.tokenizer("sit"), tok)
    images = tiny_images_dataset(tmp_path / "images")
    report = pair.method.evaluate(pair, images, EvaluateConfig(batch_size=4, device="cpu"), SampleSettings(), 4, 0)
    assert [r["resolution"] for r in report.rows] == [8, 16, 32]  # coarse to full either way
    assert all(r["n"] == 4 and r["images_per_s"] > 0 and r["fid"] == r["fid"] for r in report.rows)
    if dec:
        assert [r["stop_scale"] for r in report.rows] == [1, 2, 3] and "stop_scales" not in report.not_applicable
        assert [r["tokens"] for r in report.rows] == [N, 2 * N, 3 * N]
    else:
        assert report.key == "resolution" and all(r["tokens"] == S * N and r["downsampled_from"] == 32 for r in report.rows)
        assert "scale-causal decoder" in report.not_applicable["stop_scales"]
        assert len({r["images_per_s"] for r in report.rows}) == 1  # one full-resolution generation
    if enc:
        assert [r["input_resolution"] for r in report.upsampling] == [16, 8] and "upsampling" not in report.not_applicable
    else:
        assert report.upsampling == [] and "scale-causal encoder" in report.not_applicable["upsampling"]
    assert report.samples_grid.shape == (3 * 4, 3, 32, 32)
