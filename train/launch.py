"""Training under Ray Train (``TorchTrainer``): DDP on CPU (gloo) or GPU (nccl), for every model.

One generic per-worker loop; a :class:`Task` says what it trains (columns to read, model, step,
preview): :class:`TokenizerTask` wraps :func:`train.steps.tokenizer_train_step`,
:class:`GeneratorTask` wraps :func:`train.steps.generator_train_step`. Checkpoints
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
import posixpath
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import fsspec
import numpy as np
import torch

from coarse2fine.preprocess import schema
from coarse2fine.train import data
from coarse2fine.train.config import GeneratorTrainConfig, OptimConfig, RayConfig, TokenizerConfig, TrainConfig
from coarse2fine.train.losses import LossWeights
from coarse2fine.train.models.arsit import ARSITConfig, build_generator
from coarse2fine.train.models.discriminator import PatchDiscriminator
from coarse2fine.train.models.io import CHECKPOINT_FILE
from coarse2fine.train.models.sit import SITConfig, build_tokenizer
from coarse2fine.train.steps import (generator_train_step, tokenizer_eval_step, tokenizer_train_step, unwrap,
                                     warmup_cosine)

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


class Task(Protocol):
    """What the generic Ray Train loop needs from one kind of model (tokenizer, generator)."""

    columns: list[str]  # dataset columns every worker reads
    model_cfg: Any  # a dataclass, saved in the checkpoint as ``model_config``
    betas: tuple[float, float]

    def load(self, rows: dict[str, list], rank: int, world: int) -> int:
        """Keep this rank's rows (decoded, in memory); return how many."""

    def build(self) -> torch.nn.Module: ...

    def extras(self) -> dict[str, torch.nn.Module]:
        """Further trained modules with their own AdamW (the discriminator), by name."""

    def train_step(self, model, optimizer, scheduler, extras: dict, idx: torch.Tensor, step: int,
                   device: torch.device) -> dict[str, float]: ...

    def preview(self, model, idx: torch.Tensor, device: torch.device) -> tuple[np.ndarray, str]:
        """Images (N, 3, H, W) in [0, 1] for the logger and their grid's name."""


class TokenizerTask:
    """SIT / ViT-VQGAN on the ``images`` dataset: L2 + quantizer terms (+ adversarial)."""

    columns = ["key", "image"]
    betas = (0.9, 0.99)

    def __init__(self, model_cfg: SITConfig, train: TrainConfig) -> None:
        self.model_cfg, self.train = model_cfg, train
        self.weights = LossWeights(adversarial=train.adversarial_weight,
                                   adversarial_start=int(train.adversarial_start * train.max_steps))

    def load(self, rows, rank, world):
        self.images = data.decode_rows(rows["key"], rows["image"], rank, world)
        return len(self.images)

    def build(self):
        return build_tokenizer(self.model_cfg)

    def extras(self):
        return {"disc": PatchDiscriminator()} if self.train.adversarial_weight > 0 else {}

    def train_step(self, model, optimizer, scheduler, extras, idx, step, device):
        disc, disc_opt = extras.get("disc", (None, None))
        return tokenizer_train_step(model, optimizer, scheduler, self.images[idx].to(device), self.weights,
                                    self.train.clip_norm, step, disc, disc_opt)

    def preview(self, model, idx, device):
        x = self.images[idx[:8]].to(device)
        recon, _ = tokenizer_eval_step(model, x)
        return torch.cat([x, recon]).float().cpu().numpy(), "reconstructions"


class GeneratorTask:
    """AR-SIT on a ``tokens`` dataset: cross-entropy over the full coarse-to-fine sequence.

    Previews decode 8 class-conditional samples with the tokenizer (``tokenizer_uri``).
    """

    betas = (0.9, 0.95)  # VAR / LlamaGen (the seed gives none)

    def __init__(self, model_cfg: ARSITConfig, train: GeneratorTrainConfig, tokenizer_uri: str) -> None:
        self.model_cfg, self.train, self.tokenizer_uri = model_cfg, train, tokenizer_uri
        self.columns = ["key", "label"] + [f"ids_{s}" for s in range(model_cfg.num_scales)]

    def load(self, rows, rank, world):
        self.ids, self.labels = data.token_rows(rows, self.model_cfg.num_scales, self.model_cfg.null_class, rank, world)
        return len(self.ids)

    def build(self):
        return build_generator(self.model_cfg)

    def extras(self):
        return {}

    def train_step(self, model, optimizer, scheduler, extras, idx, step, device):
        return generator_train_step(model, optimizer, scheduler, self.ids[idx].to(device),
                                    self.labels[idx].to(device), self.train.clip_norm)

    def preview(self, model, idx, device):
        from coarse2fine.train.models.io import load_tokenizer
        from coarse2fine.train.sampling import sample_tokens

        tokenizer = load_tokenizer(self.tokenizer_uri, device)
        cond = self.labels[idx[:8]].to(device)
        ids = sample_tokens(unwrap(model), cond, self.model_cfg.seq_len,
                            generator=torch.Generator(device).manual_seed(self.train.seed))
        S, N = self.model_cfg.num_scales, self.model_cfg.tokens_per_scale
        with torch.no_grad():
            images = tokenizer.decode_indices(ids.view(-1, S, N)).clamp(0, 1)  # (8, 3, H, W)
        return images.float().cpu().numpy(), "samples"


def _save_state(path: str, task: Task, stateful: dict[str, Any], step: int) -> None:
    state = {k: unwrap(v).state_dict() for k, v in stateful.items()}
    state |= {"step": step, "rng": torch.get_rng_state(), "model_config": asdict(task.model_cfg)}
    torch.save(state, os.path.join(path, CHECKPOINT_FILE))


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, then train to ``max_steps``."""
    import ray.train
    import ray.train.torch

    task: Task = cfg["task"]
    tcfg: OptimConfig = cfg["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    rows: dict[str, list] = {c: [] for c in task.columns}
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=256, batch_format="numpy"):
        for c in task.columns:
            rows[c].extend(list(batch[c]))
    n = task.load(rows, rank, world)
    if tcfg.torch_threads:  # after reading: Ray Data's read tasks run on the CPUs Ray did not hand to us
        torch.set_num_threads(tcfg.torch_threads)

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(task.build())

    def adamw(module):
        return torch.optim.AdamW(module.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=task.betas)

    optimizer = adamw(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(tcfg.max_steps, tcfg.warmup_frac, tcfg.schedule, tcfg.final_lr_frac))
    extras = {}
    for name, module in task.extras().items():
        module = ray.train.torch.prepare_model(module)
        extras[name] = (module, torch.optim.AdamW(module.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                                  betas=(0.5, 0.9)))  # VQGAN's discriminator betas
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    for name, (module, opt) in extras.items():
        stateful |= {name: module, f"{name}_optimizer": opt}
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=False)
        for k, obj in stateful.items():
            unwrap(obj).load_state_dict(state[k])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    elif cfg.get("init_checkpoint"):  # warm start: weights of a finished run, fresh optimiser and schedule
        with fsspec.open(posixpath.join(cfg["init_checkpoint"].rstrip("/"), CHECKPOINT_FILE), "rb") as f:
            state = torch.load(f, map_location=device, weights_only=False)
        for name in ["model", *extras]:
            unwrap(stateful[name]).load_state_dict(state[name])
    logger: MetricsLogger | None = cfg.get("logger") if rank == 0 else None
    use_bf16 = tcfg.bf16 and device.type == "cuda"
    stop = min(tcfg.max_steps, cfg.get("stop_after") or tcfg.max_steps)
    for step in range(start, stop):
        idx = data.batch_indices(step, n, tcfg.batch_size, tcfg.seed, rank)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            metrics = task.train_step(model, optimizer, scheduler, extras, idx, step, device)
        done = step + 1
        if logger and (done % tcfg.log_every == 0 or done == stop or step == start):
            logger.log_metrics(metrics | ({"rows_per_worker": n} if step == start else {}), step)
        if logger and (done % tcfg.sample_every == 0 or done == stop):
            logger.log_images(*task.preview(unwrap(model), idx, device), step)
        if done % tcfg.checkpoint_every == 0 or done == stop:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    _save_state(tmp, task, stateful, done)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({**metrics, "step": done}, checkpoint=ckpt)


def fit(
    task: Task,
    dataset_uri: str,
    train: OptimConfig,
    checkpoints_root: str,
    run_name: str,
    ray_cfg: RayConfig | None = None,
    logger: MetricsLogger | None = None,
    stop_after: int | None = None,
    row_filter: str | None = None,
    init_checkpoint: str | None = None,
) -> FitResult:
    """Train (or resume) ``task`` on a dataset's rows (``row_filter``: a Ray Data expression).
    A new run starts from the weights in ``init_checkpoint`` when given (a warm start).

    ``stop_after`` ends this invocation after that many total steps with a checkpoint (a later
    call with the same ``run_name`` resumes), e.g. to fit a run into preemptible time slots.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_cfg = ray_cfg or RayConfig()
    if not ray.is_initialized():
        ray.init(address=ray_cfg.address, num_cpus=None if ray_cfg.address else ray_cfg.num_cpus,  # a cluster refuses num_cpus
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    storage_fs, storage_path = ray_storage(checkpoints_root)
    data_fs, _ = ray_storage(dataset_uri)
    shards = [u if data_fs is None else schema.url_to_fs(u)[1] for u in schema.shard_uris(dataset_uri)]
    columns = list(dict.fromkeys(task.columns + (["split"] if row_filter and "split" in row_filter else [])))
    ds = ray.data.read_parquet(shards, columns=columns, filesystem=data_fs)
    if row_filter:
        ds = ds.filter(expr=row_filter)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "train": train, "logger": logger, "stop_after": stop_after,
                           "init_checkpoint": init_checkpoint},
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


def fit_tokenizer(images_uri: str, tokenizer: TokenizerConfig, train: TrainConfig, resolution: int,
                  checkpoints_root: str, run_name: str, ray_cfg: RayConfig | None = None,
                  logger: MetricsLogger | None = None, stop_after: int | None = None,
                  init_checkpoint: str | None = None) -> FitResult:
    """Train (or resume) a tokenizer on the ``train`` split of an ``images`` dataset."""
    task = TokenizerTask(tokenizer.model_config_for(resolution), train)
    return fit(task, images_uri, train, checkpoints_root, run_name, ray_cfg, logger, stop_after, "split == 'train'",
               init_checkpoint)


def fit_generator(tokens_uri: str, model_cfg: ARSITConfig, train: GeneratorTrainConfig, tokenizer_uri: str,
                  checkpoints_root: str, run_name: str, ray_cfg: RayConfig | None = None,
                  logger: MetricsLogger | None = None, stop_after: int | None = None,
                  init_checkpoint: str | None = None) -> FitResult:
    """Train (or resume) AR-SIT on the ``train`` split of a ``tokens`` dataset (validation images
    stay unseen, so upsampling/editing are evaluated on images the generator never trained on)."""
    return fit(GeneratorTask(model_cfg, train, tokenizer_uri), tokens_uri, train, checkpoints_root, run_name,
               ray_cfg, logger, stop_after, "split == 'train'", init_checkpoint)


def ray_storage(root: str):
    """A URI for Ray (Train storage, Data reads): a local absolute path, or (gs://, memory://…)
    the fsspec filesystem wrapped for pyarrow and the in-filesystem path, so the same
    credentials/emulator settings apply as for the datasets."""
    if "://" not in root or root.startswith("file://"):
        return None, os.path.abspath(root.removeprefix("file://"))
    import pyarrow.fs

    fs, path = schema.url_to_fs(root)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
