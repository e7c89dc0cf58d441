"""Tokenizer training under a real Ray Train TorchTrainer: resume continuity, DDP sync, MLflow."""

from __future__ import annotations

import mlflow
import pytest
import torch

from conftest import tiny_configs, write_demo
from coarse2fine.evaluate.config import TrackingConfig
from coarse2fine.evaluate.tracking import MlflowLogger, configure
from coarse2fine.preprocess.beam_jobs import ingest
from coarse2fine.train.config import TokenizerConfig, TrainConfig
from coarse2fine.train.launch import fit_tokenizer
from coarse2fine.train.checkpoints import load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images_uri(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    src = write_demo(tmp / "src", 12, resolution=32)
    data, pre, store = tiny_configs(str(src), str(tmp / "store"))
    return ingest(data.model_copy(update={"validation_fraction": 0.0}), pre, store).uris["images"]


TOK_PARAMS = {"num_scales": 3, "tokens_per_scale": 4, "size": "tiny", "codebook_size": 64}


def tok_cfg(**kw) -> TokenizerConfig:
    base = dict(max_steps=8, batch_size=4, lr=3e-3, checkpoint_every=2, log_every=1, sample_every=4)
    return TokenizerConfig(sit=TOK_PARAMS, train=TrainConfig(**(base | kw)))


def losses(tracking: TrackingConfig, run_id: str) -> dict[int, float]:
    configure(tracking)
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")}


def new_run(tracking: TrackingConfig, name: str) -> str:
    configure(tracking)
    return mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name(tracking.experiment).experiment_id,
                                            run_name=name).info.run_id


def test_resumed_run_continues_the_loss_curve(ray_session, images_uri, tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    ckpts = str(tmp_path / "checkpoints")
    full_id = new_run(tracking, "full")
    fit_tokenizer(images_uri, tok_cfg(), 32, ckpts, "full", logger=MlflowLogger(tracking, full_id))
    part_id = new_run(tracking, "resumed")
    first = fit_tokenizer(images_uri, tok_cfg(), 32, ckpts, "resumed", stop_after=4,
                          logger=MlflowLogger(tracking, part_id))
    assert first.steps == 4
    second = fit_tokenizer(images_uri, tok_cfg(), 32, ckpts, "resumed", logger=MlflowLogger(tracking, part_id))
    assert second.steps == 8
    full, resumed = losses(tracking, full_id), losses(tracking, part_id)
    assert sorted(resumed) == list(range(8))  # no restart from 0, no skipped step
    import json
    progress = json.loads((tmp_path / "checkpoints" / "resumed" / "progress.json").read_text())
    assert progress["step"] == progress["total"] == 8 and progress["images_per_s"] > 0
    for step in range(8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), step
    # the reconstruction grid went to MLflow, and the checkpoint loads as a model
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(full_id, "images")]
    assert any("reconstructions" in a for a in arts), arts
    model = load_tokenizer(second.checkpoint_uri)
    recon, idx, _ = model(torch.rand(1, 3, 32, 32))
    assert recon.shape == (1, 3, 32, 32) and idx.shape == (1, 3, 4)


def test_two_workers_through_fit_log_once_checkpoint_once_and_resume_exactly(ray_session, images_uri, tmp_path):
    """The project's own ``fit`` with two DDP workers: ranks draw different batches (the curve
    differs from one worker's), rank 0 alone logs each step once and writes one set of
    checkpoints, and a run stopped at step 4 and resumed with two workers gives the same loss curve
    as the uninterrupted two-worker run."""
    from pathlib import Path

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    ckpts = str(tmp_path / "checkpoints")
    cfg = tok_cfg(num_workers=2, max_steps=6)
    ids = {name: new_run(tracking, name) for name in ("one", "two", "resumed")}
    fit_tokenizer(images_uri, tok_cfg(max_steps=6), 32, ckpts, "one", logger=MlflowLogger(tracking, ids["one"]))
    fit_tokenizer(images_uri, cfg, 32, ckpts, "two", logger=MlflowLogger(tracking, ids["two"]))
    assert fit_tokenizer(images_uri, cfg, 32, ckpts, "resumed", stop_after=4,
                         logger=MlflowLogger(tracking, ids["resumed"])).steps == 4
    assert fit_tokenizer(images_uri, cfg, 32, ckpts, "resumed", logger=MlflowLogger(tracking, ids["resumed"])).steps == 6
    one, two, resumed = (losses(tracking, ids[k]) for k in ("one", "two", "resumed"))
    configure(tracking)
    for run_id in ids.values():  # each step once: only rank 0 logs
        assert sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")) == list(range(6))
    for step in range(6):
        assert resumed[step] == pytest.approx(two[step], rel=1e-5, abs=1e-7), step
    # rank 1's batches enter the averaged gradients: from step 1 the curve leaves the one-worker curve
    assert all(two[step] != pytest.approx(one[step], rel=1e-4) for step in range(1, 6))
    # one set of checkpoints (rank 0 saves; Ray keeps the newest 2), each a loadable model
    folders = sorted(p for p in Path(ckpts, "two").glob("checkpoint_*") if p.is_dir())
    assert len(folders) == 2 and all(load_tokenizer(str(f)) is not None for f in folders)


def test_resume_takes_the_newest_checkpoint_on_disk_and_logs_each_step_once(ray_session, images_uri, tmp_path):
    """Ray's checkpoint list can lag behind the disk after a kill -9 (here: its snapshot is gone
    and a later, unlisted checkpoint is on disk): the run resumes from the newest complete
    checkpoint, steps the first run already logged are not logged twice, and the folders Ray does
    not list are deleted when the run finishes."""
    from pathlib import Path

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    ckpts = tmp_path / "checkpoints"
    full_id = new_run(tracking, "full")
    fit_tokenizer(images_uri, tok_cfg(), 32, str(ckpts), "full", logger=MlflowLogger(tracking, full_id))
    run_id = new_run(tracking, "killed")
    fit_tokenizer(images_uri, tok_cfg(), 32, str(ckpts), "killed", stop_after=6, logger=MlflowLogger(tracking, run_id))
    run_dir = Path(ckpts / "killed")
    (run_dir / "checkpoint_manager_snapshot.json").unlink()  # Ray no longer lists any checkpoint
    folders = sorted(run_dir.glob("checkpoint_*"))
    broken = run_dir / "checkpoint_9999-99-99_99-99-99.000000"  # a newer folder cut mid-write
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"truncated")
    assert len(folders) == 2  # steps 4 and 6 kept
    second = fit_tokenizer(images_uri, tok_cfg(), 32, str(ckpts), "killed", logger=MlflowLogger(tracking, run_id))
    assert second.steps == 8
    configure(tracking)
    history = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")]
    assert sorted(history) == list(range(8))  # resumed at 6, not 0: every step once
    full, resumed = losses(tracking, full_id), losses(tracking, run_id)
    for step in range(8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), step
    # retention: what Ray's own list no longer knows (the killed invocation's folders at steps 4
    # and 6, the broken one) is deleted; the one Ray lists (step 8, the only one since the resume) stays
    left = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # not Ray's checkpoint_manager_snapshot.json
    assert len(left) == 1 and broken not in left and not set(folders) & set(left)
    assert torch.load(left[-1] / "state.pt", weights_only=False)["step"] == 8


def test_two_workers_keep_parameters_in_sync(ray_session, tmp_path):
    """DDP through Ray Train (gloo): ranks start from different weights and see different data,
    yet after prepare_model and 3 adversarial steps every parameter (codebook and discriminator
    included) is identical."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path / "sums"
    out.mkdir()

    def loop(cfg):
        import ray.train.torch

        from coarse2fine.train.losses import LossWeights
        from coarse2fine.train.models.discriminator import PatchDiscriminator
        from coarse2fine.train.models.sit import build_tokenizer
        from coarse2fine.train.steps import tokenizer_train_step, warmup_cosine

        rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(rank)  # different initial weights on purpose
        local = build_tokenizer(cfg["model"])
        init = float(torch.cat([p.detach().flatten() for p in local.parameters()]).double().sum())
        model = ray.train.torch.prepare_model(local)  # DDP broadcasts rank 0's weights
        disc = ray.train.torch.prepare_model(PatchDiscriminator(channels=8, layers=2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(3))
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for step in range(3):
            tokenizer_train_step(model, opt, sched, torch.rand(2, 3, 32, 32, generator=g),
                                 LossWeights(adversarial=0.1), step=step, disc=disc, disc_optimizer=d_opt,
                                 last_layer=[proj.weight for proj in model.module.patch_out])
        params = torch.cat([p.detach().flatten() for p in [*model.module.parameters(), *disc.module.parameters()]]).double()
        torch.save({"init": init, "params": params, "codebook": model.module.quantizer.codebook.detach().clone()},
                   f"{cfg['out']}/rank{rank}.pt")
        ray.train.report({"rank": rank})

    TorchTrainer(loop, train_loop_config={"model": tok_cfg().model_config_for(32), "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "ckpt"))).fit()
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["init"] != r1["init"]
    assert torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["codebook"], r1["codebook"])
