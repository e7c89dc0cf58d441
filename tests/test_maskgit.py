"""MaskGIT (CQ's generator): the cosine masking schedule, CFG, iterative decoding invariants,
learning on CPU, and the CQ → MaskGIT chain through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_sample_grid
import torch

from coarse2fine.train import methods
from coarse2fine.train.masked import decode, random_mask
from coarse2fine.train.models.maskgit import MaskGITConfig, build_maskgit
from coarse2fine.train.sampling import guided_logits
from coarse2fine.train.steps import generator_train_step, to_floats, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
L, V, C = 16, 12, 4
LOSS = methods.generator("maskgit").loss


def model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_maskgit(MaskGITConfig(L, V, num_classes=C, **kw))


def test_masked_fraction_follows_the_cosine_schedule():
    """Per row ⌈cos(π r / 2)·L⌉ positions with r ~ U(0, 1): the mean masked fraction matches the
    integral of that count (midpoint rule, 100k points), and every row masks at least one."""
    ids = torch.zeros(40_000, L, dtype=torch.long)
    _, mask = random_mask(ids, V, torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= L
    r = (np.arange(100_000) + 0.5) / 100_000
    expected = np.mean(np.maximum(1, np.ceil(np.cos(np.pi * r / 2) * L))) / L
    assert abs(mask.float().mean().item() - expected) < 0.005
    # the share of rows with every token masked ≈ P(cos(πr/2) > (L-1)/L)
    p_full = 2 / math.pi * math.acos((L - 1) / L)
    assert abs((counts == L).float().mean().item() - p_full) < 0.01


def test_cfg_scale_one_is_the_conditional_model_and_matches_eq_4():
    c, u = torch.randn(3, V), torch.randn(3, V)
    torch.testing.assert_close(guided_logits(c, u, 1.0), c)
    t = 2.5
    torch.testing.assert_close(guided_logits(c, u, t), t * c - (t - 1) * u)  # CQ seed eq. 4


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_decoding_never_unfixes_a_token_and_ends_unmasked(steps):
    m = model()
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[0][: len(args[0]) // 2].clone()))
    ids = decode(m, torch.tensor([0, 1, C]), steps, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert len(seen) == steps and not (ids == V).any() and ids.max() < V
    assert (seen[0] == V).all()  # starts fully masked
    for before, after in zip(seen, seen[1:] + [ids]):
        fixed = before != V
        assert torch.equal(after[fixed], before[fixed])  # a fixed token stays
        assert (after != V).sum() > fixed.sum() or (after != V).all()  # progress every step
    again = decode(m, torch.tensor([0, 1, C]), steps, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)  # fixed seed, identical samples


def test_a_tiny_model_learns_its_sequences_on_cpu():
    """Four class-labelled sequences: masked-token NLL falls far below chance (ln V) and decoding
    at a low temperature under each class reproduces most of its sequence."""
    m = model(cond_drop_prob=0.0)
    data = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.96))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(400, 0.05))
    torch.manual_seed(0)
    first = to_floats(generator_train_step(m, opt, sched, data, labels, LOSS))["loss"]
    for _ in range(399):
        last = to_floats(generator_train_step(m, opt, sched, data, labels, LOSS))
    assert first > 0.8 * math.log(V) and last["loss"] < 0.2 * math.log(V), (first, last)
    assert 0 < last["masked_fraction"] <= 1
    out = decode(m, labels, 8, temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert (out == data).float().mean() > 0.9


def test_maskgit_takes_one_column_and_refuses_scales():
    mg = methods.generator("maskgit")
    from coarse2fine.preprocess.schema import TokenColumn

    cfg = mg.model_config(mg.params(), [TokenColumn("ids", (64,), "int32", 512, "channel")], num_classes=10)
    assert (cfg.seq_len, cfg.codebook_size, cfg.mask_id, cfg.null_class) == (64, 512, 512, 10)
    with pytest.raises(methods.UnsupportedError, match="one column"):
        mg.accept([TokenColumn(f"ids_{s}", (2, 2), "int32", 8, "scale") for s in range(3)])


@pytest.mark.slow
def test_cq_maskgit_chain_through_the_cli(tmp_path, capsys):
    import mlflow
    import ray

    from coarse2fine.pipelines.cli import main

    sets = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.source={tmp_path}/imgs",
            "--set", f"storage.root={tmp_path}/store", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", "tokenizer.method=cq", "--set", "generator.method=maskgit"]
    try:
        assert main(["demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]) == 0
        assert main(["train-generator", *sets]) == 0
        run_id = capsys.readouterr().out.split("generator run ")[1].split()[0]
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        tags = mlflow.get_run(run_id).data.tags
        assert tags["c2f.method"] == "maskgit" and tags["c2f.tokenizer_method"] == "cq"
        grid = tmp_path / "g.png"
        assert main(["generate", "--run", run_id, "--n", "2", "--steps", "4", "--class", "0", "--out", str(grid),
                     *sets]) == 0
        assert_sample_grid(grid, 2, 32)
        ids = np.load(f"{grid}.tokens.npz")["ids"]
        assert ids.shape == (2, 16) and ids.max() < 64  # 16 channel tokens, no mask id left
        capsys.readouterr()
        assert main(["generate", "--run", run_id, "--stop-scale", "1", *sets]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "--stop-scale is not supported by generator method maskgit" in err and "--steps" in err
        assert main(["evaluate", "--run", run_id, *sets]) == 0
        metrics = mlflow.get_run(run_id).data.metrics
        for steps in (10, 16):  # the default and one token per step (CQ Table 7 in miniature)
            assert f"eval/fid_steps{steps}" in metrics and metrics[f"eval/images_per_s_steps{steps}"] > 0
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "eval")}
        assert {"eval/steps.json", "eval/samples_per_steps.png"} <= arts
    finally:
        ray.shutdown()
