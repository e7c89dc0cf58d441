"""Stages as plain functions of the typed config (usable from the CLI, and later Prefect tasks).

They pass URIs and MLflow run ids between each other, never arrays.
"""

from __future__ import annotations

import logging

import mlflow

from coarse2fine.evaluate import tracking
from coarse2fine.evaluate.tracking import MlflowLogger
from coarse2fine.pipelines.config import Config
from coarse2fine.preprocess import schema, storage
from coarse2fine.preprocess.beam_jobs import StageResult, preprocess_all, run_image_stage
from coarse2fine.train.losses import PERCEPTUAL_OFF

log = logging.getLogger(__name__)
FINGERPRINT_TAG = "c2f.fingerprint"


def preprocess(cfg: Config) -> list[StageResult]:
    return preprocess_all(cfg.data, cfg.preprocess, cfg.storage)


def tokenizer_fingerprint(cfg: Config, images_fp: str) -> str:
    """What determines a trained tokenizer: its config, the optimisation, the data, the code."""
    from coarse2fine.train import data, launch, losses, steps
    from coarse2fine.train.models import blocks, quantizer, sit

    train = cfg.train.model_dump(exclude={"log_every", "sample_every", "checkpoint_every"})
    code = storage.code_version(data, launch, losses, steps, blocks, quantizer, sit)
    return storage.fingerprint("tokenizer", {"tokenizer": cfg.tokenizer.model_dump(), "train": train,
                                             "resolution": cfg.data.resolution},
                               [images_fp], code)


def _find_run(cfg: Config, fp: str) -> str | None:
    tracking.configure(cfg.tracking)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment],
                              filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fp}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return None if runs.empty else str(runs.iloc[0]["run_id"])


def train_tokenizer(cfg: Config, stop_after: int | None = None) -> dict[str, str]:
    """Train (or resume, or reuse when finished) the configured tokenizer; returns run id and checkpoint."""
    from coarse2fine.train.launch import fit_tokenizer

    images_uri = preprocess(cfg)[0].uris["images"]
    images_fp = schema.read_manifest(images_uri)["fingerprint"]
    fp = tokenizer_fingerprint(cfg, images_fp)
    run_name = f"tokenizer-{cfg.tokenizer.method}-{fp}"
    run_id = _find_run(cfg, fp)
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags if run_id else {}
    if tags.get("c2f.status") == "finished":
        log.info("train-tokenizer: reusing finished run %s", run_id)
        return {"run_id": run_id, "checkpoint": tags["c2f.checkpoint"], "reused": "yes"}
    if run_id is None:
        with tracking.run(cfg.tracking, run_name=run_name, tags={
            FINGERPRINT_TAG: fp, "c2f.method": cfg.tokenizer.method, "c2f.kind": "tokenizer",
            "c2f.images": images_uri, "c2f.images_fingerprint": images_fp,
        }) as active:
            tracking.log_config(cfg.model_dump(mode="json"))
            mlflow.set_tag("c2f.perceptual", PERCEPTUAL_OFF)
            run_id = active.info.run_id
        client.set_terminated(run_id, "RUNNING")
    else:
        log.info("train-tokenizer: resuming run %s from its last checkpoint", run_id)
    try:
        fit = fit_tokenizer(images_uri, cfg.tokenizer, cfg.train, cfg.data.resolution,
                            storage.join(cfg.storage.root, "checkpoints"), run_name, cfg.ray,
                            MlflowLogger(cfg.tracking, run_id), stop_after)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_tag(run_id, "c2f.checkpoint", fit.checkpoint_uri)
    finished = fit.steps >= cfg.train.max_steps
    client.set_tag(run_id, "c2f.status", "finished" if finished else f"paused at step {fit.steps}")
    client.set_terminated(run_id, "FINISHED" if finished else "KILLED")
    return {"run_id": run_id, "checkpoint": fit.checkpoint_uri, "reused": "no", "steps": str(fit.steps)}


def _finished_tokenizer_run(cfg: Config, run_id: str) -> tuple[mlflow.MlflowClient, dict[str, str]]:
    """The MLflow client and the tags of a finished tokenizer run (KeyError otherwise)."""
    tracking.set_store(cfg.tracking)
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    if tags.get("c2f.status") != "finished":
        raise KeyError(f"MLflow run {run_id} is not a finished tokenizer run (status: {tags.get('c2f.status')})")
    return client, tags


def evaluate_tokenizer(cfg: Config, run_id: str) -> list[dict]:
    """Per-resolution reconstruction table of a trained tokenizer, logged into its MLflow run."""
    from coarse2fine.evaluate.tokenizer_eval import evaluate_checkpoint

    client, tags = _finished_tokenizer_run(cfg, run_id)
    report = evaluate_checkpoint(tags["c2f.checkpoint"], tags["c2f.images"], cfg.evaluate)
    for row in report.rows:
        res = row["resolution"]
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"eval/{k}_{res}px", float(v), 0, 0)
                                          for k, v in row.items() if k != "resolution" and v == v])
    top = report.rows[0]
    for k in ("psnr", "ssim", "l1", "rfid"):
        if k in top and top[k] == top[k]:
            client.log_metric(run_id, k, float(top[k]))
    for k, v in report.codebook.items():
        client.log_metric(run_id, k, float(v))
    with mlflow.start_run(run_id=run_id):
        tracking.log_table(report.rows, "eval/per_resolution.json")
        tracking.log_image_grid(report.grid, "eval/reconstructions.png")
    return report.rows


def tokenize(cfg: Config, run_id: str) -> StageResult:
    """Beam job: the ``tokens/{fingerprint}`` dataset (ids per scale) of a trained tokenizer run."""
    from coarse2fine.train import tokenize as tok
    from coarse2fine.train.models import io, sit
    from coarse2fine.train.models.io import load_tokenizer

    client, tags = _finished_tokenizer_run(cfg, run_id)
    ckpt, images_uri = tags["c2f.checkpoint"], tags["c2f.images"]
    model_cfg = load_tokenizer(ckpt).cfg
    result = run_image_stage(
        "tokens", images_uri, cfg.preprocess, cfg.storage,
        {"tokenizer_run": run_id, "checkpoint": ckpt, "fingerprint": tags[FINGERPRINT_TAG]},
        storage.code_version(tok, io, sit), schema.tokens_schema(model_cfg.num_scales, model_cfg.grid),
        tok.token_rows(ckpt),
    )
    client.set_tag(run_id, "c2f.tokens", result.uris["tokens"])
    return result
