"""Tokenizer training under Ray Train (``TorchTrainer``): DDP on CPU (gloo) or GPU (nccl).

The per-worker loop is a few lines around :func:`train.steps.tokenizer_train_step`. Checkpoints
(model, optimiser, scheduler, step, RNG) go to ``{storage.root}/checkpoints/{run name}`` (any
pyarrow/fsspec URI, gs:// included). Re-running with the same run name resumes from the latest
checkpoint (Ray Train V2: same ``RunConfig(name, storage_path)``); batches are a pure function of
the step (``train.data``), so the resumed loss curve continues the original one.

Metrics and image grids go to an injected ``logger`` (rank 0 only): any picklable object with
``log_metrics(dict, step)`` and ``log_images(images_NCHW, name, step)`` — the entry point passes
an MLflow logger, so this module never imports MLflow.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from coarse2fine.preprocess import schema
from coarse2fine.train import data
from coarse2fine.train.config import RayConfig, TokenizerConfig, TrainConfig
from coarse2fine.train.losses import LossWeights
from coarse2fine.train.models.discriminator import PatchDiscriminator
from coarse2fine.train.models.io import CHECKPOINT_FILE
from coarse2fine.train.models.sit import SITConfig, build_tokenizer
from coarse2fine.train.steps import tokenizer_eval_step, tokenizer_train_step, unwrap, warmup_cosine

log = logging.getLogger(__name__)


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, images_NCHW: np.ndarray, name: str, step: int) -> None: ...


@dataclass
class FitResult:
    run_name: str
    checkpoint_uri: str
    steps: int
    metrics: dict[str, float]


def save_state(path: str, model, optimizer, scheduler, step: int, model_cfg: SITConfig,
               disc=None, disc_optimizer=None) -> None:
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "rng": torch.get_rng_state(),
             "model_config": asdict(model_cfg)}
    if disc is not None:
        state |= {"disc": unwrap(disc).state_dict(), "disc_optimizer": disc_optimizer.state_dict()}
    torch.save(state, os.path.join(path, CHECKPOINT_FILE))


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, then train to ``max_steps``."""
    import ray.train
    import ray.train.torch

    tcfg: TrainConfig = cfg["train"]
    model_cfg: SITConfig = cfg["model"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    shard = ray.train.get_dataset_shard("train")
    rows = {"key": [], "image": []}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        rows["key"].extend(batch["key"].tolist())
        rows["image"].extend(batch["image"].tolist())
    images = data.decode_rows(rows["key"], rows["image"], rank, world)

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(build_tokenizer(model_cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tcfg.max_steps, tcfg.warmup_frac))
    disc = disc_optimizer = None
    if tcfg.adversarial_weight > 0:
        disc = ray.train.torch.prepare_model(PatchDiscriminator())
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.5, 0.9))
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if disc is not None:
            unwrap(disc).load_state_dict(state["disc"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    logger: MetricsLogger | None = cfg.get("logger") if rank == 0 else None
    use_bf16 = tcfg.bf16 and device.type == "cuda"
    stop = min(tcfg.max_steps, cfg.get("stop_after") or tcfg.max_steps)
    weights = LossWeights(adversarial=tcfg.adversarial_weight,
                          adversarial_start=int(tcfg.adversarial_start * tcfg.max_steps))
    for step in range(start, stop):
        x = images[data.batch_indices(step, len(images), tcfg.batch_size, tcfg.seed, rank)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            metrics = tokenizer_train_step(model, optimizer, scheduler, x, weights, tcfg.clip_norm, step,
                                           disc, disc_optimizer)
        done = step + 1
        if logger and (done % tcfg.log_every == 0 or done == stop or step == start):
            logger.log_metrics(metrics, step)
        if logger and (done % tcfg.sample_every == 0 or done == stop):
            recon, _ = tokenizer_eval_step(unwrap(model), x[:8])
            logger.log_images(torch.cat([x[:8], recon]).float().cpu().numpy(), "reconstructions", step)
        if done % tcfg.checkpoint_every == 0 or done == stop:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_state(tmp, model, optimizer, scheduler, done, model_cfg, disc, disc_optimizer)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({**metrics, "step": done}, checkpoint=ckpt)


def fit_tokenizer(
    images_uri: str,
    tokenizer: TokenizerConfig,
    train: TrainConfig,
    resolution: int,
    checkpoints_root: str,
    run_name: str,
    ray_cfg: RayConfig | None = None,
    logger: MetricsLogger | None = None,
    stop_after: int | None = None,
) -> FitResult:
    """Train (or resume) a tokenizer on the ``train`` split of an ``images`` dataset.

    ``stop_after`` ends this invocation after that many total steps with a checkpoint (a later
    call with the same ``run_name`` resumes), e.g. to fit a run into preemptible time slots.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_cfg = ray_cfg or RayConfig()
    if not ray.is_initialized():
        ray.init(address=ray_cfg.address, num_cpus=ray_cfg.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    model_cfg = tokenizer.model_config_for(resolution)
    storage_fs, storage_path = ray_storage(checkpoints_root)
    data_fs, _ = ray_storage(images_uri)
    shards = [u if data_fs is None else schema.url_to_fs(u)[1] for u in schema.shard_uris(images_uri)]
    ds = ray.data.read_parquet(shards, columns=["key", "split", "image"], filesystem=data_fs)
    ds = ds.filter(expr="split == 'train'")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": train, "model": model_cfg, "logger": logger, "stop_after": stop_after},
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every rank sees all rows, shards by key
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    path = result.checkpoint.path
    uri = f"{checkpoints_root.split('://', 1)[0]}://{path.lstrip('/')}" if storage_fs is not None else path
    return FitResult(run_name, uri, int(result.metrics.get("step", 0)), dict(result.metrics))


def ray_storage(root: str):
    """A URI for Ray (Train storage, Data reads): a local absolute path, or (gs://, memory://…)
    the fsspec filesystem wrapped for pyarrow and the in-filesystem path, so the same
    credentials/emulator settings apply as for the datasets."""
    if "://" not in root or root.startswith("file://"):
        return None, os.path.abspath(root.removeprefix("file://"))
    import pyarrow.fs

    fs, path = schema.url_to_fs(root)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
