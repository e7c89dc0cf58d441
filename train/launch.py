"""Training under Ray Train (``TorchTrainer``): DDP on CPU (gloo) or GPU (nccl), for every model.

One generic per-worker loop; a task (``train/tasks.py``) says what it trains (columns to read,
model, step, preview) with what its method plug-in declares. Checkpoints (``train/checkpoints.py``:
model, optimiser, scheduler, step, RNG, method and model config) go to ``{storage.root}/checkpoints/{run name}`` (any
pyarrow/fsspec URI, gs:// included). Re-running with the same run name resumes from the latest
checkpoint (Ray Train V2: same ``RunConfig(name, storage_path)``); batches are a pure function of
the step (``train.data``), so the resumed loss curve continues the original one.

Metrics and image grids go to an injected ``logger`` (rank 0 only): any picklable object with
``log_metrics(dict, step)`` and ``log_images(images_NCHW, name, step, row_labels)`` — the entry point passes
an MLflow logger, so this module never imports MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from coarse2fine.preprocess import schema
from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train import checkpoints, data, kernels
from coarse2fine.train.config import OptimConfig, RayConfig, TokenizerConfig
from coarse2fine.train.losses import PerceptualChoice, resolve_perceptual
from coarse2fine.train.steps import to_floats, unwrap, warmup_cosine
from coarse2fine.train.tasks import GeneratorTask, Task, TokenizerTask

log = logging.getLogger(__name__)


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def logged_steps(self, key: str = "loss") -> set[int]: ...

    def log_images(self, images_NCHW: np.ndarray, name: str, step: int, row_labels: list[str]) -> None: ...


@dataclass
class FitResult:
    run_name: str
    checkpoint_uri: str
    steps: int
    metrics: dict[str, float]


PROGRESS_FILE = "progress.json"  # rank 0's latest step, beside the run's checkpoints
PROGRESS_POLL_S = 5.0  # how often the driver prints it


def write_progress(run_uri: str, step: int, total: int, loss: float, images_per_s: float) -> None:
    """Rank 0's progress for the driver's console (any fsspec URI: the workers may be remote)."""
    fs, path = schema.url_to_fs(run_uri)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{PROGRESS_FILE}", "w") as f:
        json.dump({"step": step, "total": total, "loss": loss, "images_per_s": images_per_s}, f)


def progress_line(name: str, p: dict) -> str:
    """``name: step 120/1000 · loss 0.0312 · 14.2 img/s · ETA 1m02s``."""
    left = (p["total"] - p["step"]) * p.get("seconds_per_step", 0.0)
    eta = f" · ETA {int(left // 60)}m{int(left % 60):02d}s" if p.get("seconds_per_step") else ""
    return (f"{name}: step {p['step']}/{p['total']} · loss {p['loss']:.4g} · {p['images_per_s']:.1f} img/s{eta}")


class _Progress(threading.Thread):
    """Driver thread: prints rank 0's progress file when it changes (Ray runs with worker logs off)."""

    def __init__(self, run_uri: str, name: str) -> None:
        super().__init__(daemon=True)
        self.run_uri, self.name, self.done = run_uri, name, threading.Event()

    def run(self) -> None:
        seen, last_t = None, time.monotonic()
        fs, path = schema.url_to_fs(self.run_uri)
        while not self.done.wait(PROGRESS_POLL_S):
            try:
                with fs.open(f"{path}/{PROGRESS_FILE}") as f:
                    p = json.load(f)
            except (OSError, ValueError):  # not written yet, or being rewritten
                continue
            if seen is not None and p["step"] > seen:
                p["seconds_per_step"] = (time.monotonic() - last_t) / (p["step"] - seen)
            if p["step"] != seen:
                log.info(progress_line(self.name, p))
                seen, last_t = p["step"], time.monotonic()


def _trainables(task: Task, tcfg: OptimConfig, device: torch.device) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The model, AdamW and schedule, and the extra modules with their optimisers, all on ``device``
    and prepared for DDP; returned as the checkpoint's ``stateful`` dict and the task's ``extras``."""
    import ray.train.torch

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(task.build(), move_to_device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=task.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(tcfg.max_steps, tcfg.warmup_frac, tcfg.schedule, tcfg.final_lr_frac))
    stateful: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    extras = {}
    for name, (module, lr) in task.extras().items():
        module = ray.train.torch.prepare_model(module, move_to_device=device)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=tcfg.weight_decay,
                                betas=(0.5, 0.9))  # VQGAN's discriminator betas
        extras[name] = (module, opt)
        stateful |= {name: module, f"{name}_optimizer": opt}
    return stateful, extras


def _worker_device(tcfg: OptimConfig) -> tuple[torch.device, Callable[[], None]]:
    """The device a worker trains on and what ends each step there: Ray Train's device (CPU, or
    CUDA with ``use_gpu``; nothing to do), or torch_xla's (``train.device: xla``), where
    ``torch_xla.sync()`` cuts the lazily traced step into a graph and runs it, as torch_xla's
    training loops do after the optimiser step."""
    if tcfg.device == "xla":
        import torch_xla

        return torch_xla.device(), torch_xla.sync
    import ray.train.torch

    return ray.train.torch.get_device(), lambda: None


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists (else warm start if asked), train to ``max_steps``."""
    import ray.train
    import ray.train.torch

    task: Task = cfg["task"]
    tcfg: OptimConfig = cfg["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, end_step = _worker_device(tcfg)
    load_to = "cpu" if device.type == "xla" else device  # torch.load cannot map to XLA; load_state_dict copies
    stream = data.ShardStream(data.rank_rows(cfg["dataset_uri"], "train", rank, world), task.columns, task.decode,
                              tcfg.seed, rank)
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    kernels.force_reference(tcfg.kernels == "reference")
    stateful, extras = _trainables(task, tcfg, device)
    model, optimizer, scheduler = stateful["model"], stateful["optimizer"], stateful["scheduler"]
    start, state, ray_folder = 0, None, None
    if checkpoint := ray.train.get_checkpoint():
        ray_folder = os.path.basename(checkpoint.path.rstrip("/"))
        with checkpoint.as_directory() as d:
            state = checkpoints.read_state(d, load_to)
    # Ray's list lags behind the disk after a kill: a newer complete checkpoint on disk wins
    state = checkpoints.newest_state(cfg["run_uri"], load_to, newer_than=ray_folder) or state
    if state is None and cfg.get("continue_from"):  # a longer run continues a shorter one's full state
        state = checkpoints.read_state(cfg["continue_from"], load_to)
    if state is not None:
        start = checkpoints.resume(stateful, state)
    elif cfg.get("init_checkpoint"):
        checkpoints.warm_start(stateful, cfg["init_checkpoint"], ["model", *extras], load_to)
    logger: MetricsLogger | None = cfg.get("logger") if rank == 0 else None
    logged = logger.logged_steps() if logger and start > 0 else set()  # a killed run may have logged past its checkpoint
    use_bf16 = tcfg.bf16 and device.type == "cuda"
    stop = min(tcfg.max_steps, cfg.get("stop_after") or tcfg.max_steps)
    tick = time.perf_counter()
    for step in range(start, stop):
        batch = stream.batch(step, tcfg.batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            metrics = task.train_step(model, optimizer, scheduler, extras, batch, step, device)
        end_step()
        metrics = to_floats(metrics)  # after the step ran: one host copy
        done = step + 1
        if rank == 0 and (done % tcfg.log_every == 0 or done == stop or step == start):
            if logger and step not in logged:
                logger.log_metrics(metrics | ({"rows_per_worker": len(stream)} if step == start else {}), step)
            rate = tcfg.batch_size * world * (done - start) / max(time.perf_counter() - tick, 1e-9)
            write_progress(cfg["run_uri"], done, tcfg.max_steps, metrics["loss"], rate)
        if logger and (done % tcfg.sample_every == 0 or done == stop):
            images, name, labels = task.preview(unwrap(model), batch, device)
            logger.log_images(images, name, step, labels)
        if done % tcfg.checkpoint_every == 0 or done == stop:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    checkpoints.save_state(tmp, task.method.kind, task.method.name, task.model_cfg, stateful, done)
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
    init_checkpoint: str | None = None,
    continue_from: str | None = None,
) -> FitResult:
    """Train (or resume) ``task`` on the ``train`` split of a dataset, which every worker streams
    itself (``train.data``: its rows, one shard at a time; so the workers, like Ray Data's read
    tasks, need the dataset's storage credentials).
    A new run starts from the weights in ``init_checkpoint`` when given (a warm start), or from the
    whole state in ``continue_from`` (a shorter run of the same spec: weights, optimisers, schedule
    position, RNG and step; the schedule itself is this run's, so it stretches to ``max_steps``).

    ``stop_after`` ends this invocation after that many total steps with a checkpoint (a later
    call with the same ``run_name`` resumes), e.g. to fit a run into preemptible time slots.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(ray_cfg or RayConfig())
    storage_fs, storage_path = ray_storage(checkpoints_root)
    schema.shard_uris(dataset_uri)  # an incomplete dataset fails here, in one line, not in every worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "train": train, "logger": logger, "stop_after": stop_after,
                           "init_checkpoint": init_checkpoint, "continue_from": continue_from,
                           "dataset_uri": dataset_uri,
                           "run_uri": schema.join(checkpoints_root, run_name)},
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    progress = _Progress(schema.join(checkpoints_root, run_name), f"{task.method.kind} {task.method.name}")
    progress.start()
    try:
        result = trainer.fit()
    finally:
        progress.done.set()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    path = result.checkpoint.path
    listed = [c.path for c, _ in result.best_checkpoints or []] or [path]
    checkpoints.prune(schema.join(checkpoints_root, run_name), listed)  # folders Ray's retention does not know
    uri = f"{checkpoints_root.split('://', 1)[0]}://{path.lstrip('/')}" if storage_fs is not None else path
    return FitResult(run_name, uri, int(result.metrics.get("step", 0)), dict(result.metrics))


def ensure_ray(ray_cfg: RayConfig) -> dict[str, float]:
    """Start (local) or join (cluster) Ray once per process; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cfg.address, num_cpus=None if ray_cfg.address else ray_cfg.num_cpus,  # a cluster refuses num_cpus
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        log.info("Ray: %s, %d node(s), %g CPUs, %g GPUs", f"cluster at {ray_cfg.address}" if ray_cfg.address
                 else "local", len(nodes), ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    return ray.cluster_resources()


def fit_tokenizer(images_uri: str, tokenizer: TokenizerConfig, resolution: int, checkpoints_root: str,
                  run_name: str, ray_cfg: RayConfig | None = None, logger: MetricsLogger | None = None,
                  stop_after: int | None = None, init_checkpoint: str | None = None,
                  decomposition_uri: str | None = None, perceptual: PerceptualChoice | None = None,
                  continue_from: str | None = None) -> FitResult:
    """Train (or resume) the configured tokenizer method on the ``train`` split of an ``images``
    dataset (joined by key with ``decomposition_uri`` for a method that takes bases, CART), with
    the ``perceptual`` loss the caller resolved (None: resolved here from ``tokenizer.train``,
    without torch hub's cache)."""
    method = tokenizer.method_plugin()
    t = tokenizer.train
    perceptual = perceptual or resolve_perceptual(t.perceptual, t.perceptual_weight, t.lpips_backbone)
    if t.device == "xla" and perceptual.kind == "inception":
        raise UserValueError("the Inception-stem perceptual distance is a TorchScript module, which torch_xla cannot "
                             "run: for train.device: xla set tokenizer.train.perceptual to ms_ssim, lpips (with "
                             "lpips_backbone) or off")
    task = TokenizerTask(method, method.model_config(tokenizer.params(), resolution), tokenizer.train, perceptual,
                         decomposition_uri)
    return fit(task, images_uri, tokenizer.train, checkpoints_root, run_name, ray_cfg, logger, stop_after,
               init_checkpoint, continue_from)


def fit_generator(tokens_uri: str, task: GeneratorTask, checkpoints_root: str, run_name: str,
                  ray_cfg: RayConfig | None = None, logger: MetricsLogger | None = None,
                  stop_after: int | None = None, init_checkpoint: str | None = None,
                  continue_from: str | None = None) -> FitResult:
    """Train (or resume) a generator task on the ``train`` split of a ``tokens`` dataset (validation
    images stay unseen, so upsampling/editing are evaluated on images the generator never trained on)."""
    return fit(task, tokens_uri, task.train, checkpoints_root, run_name, ray_cfg, logger, stop_after,
               init_checkpoint, continue_from)


def ray_storage(root: str):
    """A URI for Ray Train's storage: a local absolute path, or (gs://, memory://…)
    the fsspec filesystem wrapped for pyarrow and the in-filesystem path, so the same
    credentials/emulator settings apply as for the datasets."""
    if "://" not in root or root.startswith("file://"):
        return None, os.path.abspath(root.removeprefix("file://"))
    import pyarrow.fs

    fs, path = schema.url_to_fs(root)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
