"""MLflow run bookkeeping for trained models: fingerprints, reuse, resume, warm starts, lookups.

Fingerprint = hash(kind, spec, data fingerprint, code). A finished run with it is reused, a paused
or killed one resumed (same MLflow run, same Ray run name), otherwise a new run starts.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import mlflow
import yaml

from coarse2fine.evaluate import tracking
from coarse2fine.evaluate.config import TrackingConfig
from coarse2fine.evaluate.tracking import TRAIN_TIME_METRIC, MlflowLogger
from coarse2fine.preprocess import storage
from coarse2fine.preprocess.errors import UserKeyError

log = logging.getLogger(__name__)
FINGERPRINT_TAG = "c2f.fingerprint"
LINEAGE_TAG = "c2f.lineage"  # fingerprint without the data: runs a warm start may continue
DATA_TAG = "c2f.data_fingerprint"  # the dataset a run trained on
EVALUATED_TAG = "c2f.evaluated"  # fingerprint of the evaluation protocol last logged into a run
STATUS_TAG = "c2f.status"  # "finished" or "paused at step N"
CHECKPOINT_TAG = "c2f.checkpoint"
EXTEND_TAG = "c2f.extend_key"  # fingerprint without train.max_steps: a longer run continues a shorter one
STEPS_TAG = "c2f.max_steps"
CONTINUED_TAG = "c2f.continued_from"  # the shorter finished run a longer one continued
CONTINUED_CHECKPOINT_TAG = "c2f.continued_from_checkpoint"
CONFIG_ARTIFACT = "c2f/config.yaml"  # the resolved config a run was started with (commands without --config load it)
MODEL_ARTIFACT = "model"  # a finished run's final model, weights only (checkpoints.load_model reads the folder)


@dataclass(frozen=True)
class RunRef:
    """A trained model's MLflow run: its id, newest checkpoint, whether it was reused (not trained
    by this call) and the steps it reached."""

    run_id: str
    checkpoint: str
    reused: bool
    steps: int | None = None


def find_run(tracking_cfg: TrackingConfig, tags: dict[str, str]) -> mlflow.entities.Run | None:
    """The latest run of the experiment carrying all ``tags``."""
    tracking.configure(tracking_cfg)
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs(experiment_names=[tracking_cfg.experiment], filter_string=where, max_results=1,
                              order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0] if runs else None


def _by_extend_key(tracking_cfg: TrackingConfig, extend: str) -> list[mlflow.entities.Run]:
    """Finished runs that differ from a spec only in ``train.max_steps`` (tag :data:`EXTEND_TAG`)."""
    tracking.configure(tracking_cfg)
    where = f"tags.`{EXTEND_TAG}` = '{extend}' and tags.`{STATUS_TAG}` = 'finished'"
    return mlflow.search_runs(experiment_names=[tracking_cfg.experiment], filter_string=where, output_format="list")


def _steps(run: mlflow.entities.Run) -> int:
    return int(run.data.tags[STEPS_TAG])


def _phases_kept(train: dict, done: int, max_steps: int) -> bool:
    """Whether a run that stopped at step ``done`` can continue to ``max_steps``: the phases set as
    fractions of ``max_steps`` (warm-up; the adversarial loss's start) must still begin by ``done``,
    or the longer run would, e.g., switch its discriminator off again."""
    fractions = [train.get("warmup_frac", 0.0)]
    if train.get("adversarial_weight", 0) > 0:
        fractions.append(train.get("adversarial_start", 0.0))
    return all(f * max_steps <= done for f in fractions)


def _start(tracking_cfg: TrackingConfig, run_name: str, tags: dict[str, str], config: dict) -> str:
    with tracking.run(tracking_cfg, run_name=run_name, tags=tags) as active:
        tracking.log_config(config)
        mlflow.log_text(yaml.safe_dump(config, sort_keys=False), CONFIG_ARTIFACT)
        run_id = active.info.run_id
    mlflow.MlflowClient().set_terminated(run_id, "RUNNING")
    return run_id


def tracked_fit(tracking_cfg: TrackingConfig, config: dict, kind: str, method: str, spec: dict, code: str,
                data_fp: str, tags: dict[str, str], max_steps: int, warm_start: bool,
                fit_fn: Callable) -> RunRef:
    """Reuse, resume or start the run of ``(kind, spec, data, code)`` and train it with
    ``fit_fn(logger, run_name, init_checkpoint, continue_from)`` (returns a :class:`train.launch.FitResult`).

    ``warm_start`` (nightly retraining): a new run starts from the weights of the latest finished
    run of the same lineage (same spec and code, any data) — or that run is reused when it already
    saw this data. Otherwise a new run whose spec differs from finished runs only in a larger
    ``train.max_steps`` continues the one that trained longest (``continue_from``: its checkpoint,
    with optimiser, schedule position and step), in a new MLflow run tagged :data:`CONTINUED_TAG`;
    the shorter run stays as it was. ``config`` (the whole config) is logged as the new run's parameters.
    """
    lineage = storage.fingerprint(kind, spec, [], code)
    init = find_run(tracking_cfg, {LINEAGE_TAG: lineage, STATUS_TAG: "finished"}) if warm_start else None
    if init is not None and init.data.tags.get(DATA_TAG) == data_fp:
        log.info("train-%s: reusing run %s, it already saw this data", kind, init.info.run_id)
        return RunRef(init.info.run_id, init.data.tags[CHECKPOINT_TAG], True)
    inputs = [data_fp] + ([init.data.tags[FINGERPRINT_TAG]] if init else [])
    fp = storage.fingerprint(kind, spec, inputs, code)
    unbounded = spec | {"train": {k: v for k, v in spec["train"].items() if k != "max_steps"}}
    extend = storage.fingerprint(kind, unbounded, inputs, code)
    run = find_run(tracking_cfg, {FINGERPRINT_TAG: fp})
    base, cont = None, None  # a shorter finished run a longer one continues (full state: weights, optimiser, step)
    if run is None and init is None:
        done = _by_extend_key(tracking_cfg, extend)
        shorter = max((r for r in done if _steps(r) < max_steps), key=_steps, default=None)
        if shorter is not None and _phases_kept(spec["train"], _steps(shorter), max_steps):
            base = shorter
            # a continued run is its own model (its history differs from a fresh one's): its fingerprint says so
            fp = storage.fingerprint(kind, spec, inputs + [base.data.tags[FINGERPRINT_TAG]], code)
            run = find_run(tracking_cfg, {FINGERPRINT_TAG: fp})
            cont = base.data.tags[CHECKPOINT_TAG]
        elif shorter is not None:
            log.info("train-%s: starting afresh: continuing run %s (%d steps) to %d steps would move its warm-up or "
                     "adversarial start (fractions of max_steps) past the step it stopped at", kind,
                     shorter.info.run_id, _steps(shorter), max_steps)
        elif done:
            log.info("train-%s: starting afresh: the runs of this config trained longer (%s steps), and a shorter "
                     "schedule cannot continue them", kind, ", ".join(str(_steps(r)) for r in done))
    run_name = f"{kind}-{method}-{fp}"
    if run is not None and run.data.tags.get(STATUS_TAG) == "finished":
        log.info("train-%s: reusing finished run %s", kind, run.info.run_id)
        return RunRef(run.info.run_id, run.data.tags[CHECKPOINT_TAG], True)
    if run is None:
        extra = {EXTEND_TAG: extend, STEPS_TAG: str(max_steps)}
        if init:
            extra["c2f.warm_start_from"] = init.info.run_id
        if base:
            extra |= {CONTINUED_TAG: base.info.run_id, CONTINUED_CHECKPOINT_TAG: cont}
        run_id = _start(tracking_cfg, run_name, {
            FINGERPRINT_TAG: fp, LINEAGE_TAG: lineage, DATA_TAG: data_fp, "c2f.kind": kind, "c2f.method": method,
            **tags, **extra}, config)
        if init:
            log.info("train-%s: warm start from run %s", kind, init.info.run_id)
        elif base:
            log.info("train-%s: continuing run %s (finished at %d steps) to %d steps in a new run; the learning-rate "
                     "schedule is stretched to %d steps from there", kind, base.info.run_id, _steps(base), max_steps,
                     max_steps)
    else:
        run_id = run.info.run_id
        cont = run.data.tags.get(CONTINUED_CHECKPOINT_TAG)  # killed before its first checkpoint: continue again
        log.info("train-%s: resuming run %s from its last checkpoint", kind, run_id)
    client = mlflow.MlflowClient()
    log.info("train-%s: %s run %s (%s) — watch it with: mlflow ui --backend-store-uri %s", kind, method, run_id,
             run_name, tracking_cfg.uri)
    previous = client.get_run(run_id).data.metrics.get(TRAIN_TIME_METRIC, 0.0)
    t0 = time.perf_counter()
    try:
        fit = fit_fn(MlflowLogger(tracking_cfg, run_id), run_name, init.data.tags[CHECKPOINT_TAG] if init else None,
                     cont)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        client.log_metric(run_id, TRAIN_TIME_METRIC, previous + time.perf_counter() - t0)
    client.set_tag(run_id, CHECKPOINT_TAG, fit.checkpoint_uri)
    finished = fit.steps >= max_steps
    if finished:  # the run carries its model: it stays usable where the checkpoint store is not reachable
        from coarse2fine.train import checkpoints

        try:
            with tempfile.TemporaryDirectory() as tmp:
                client.log_artifact(run_id, checkpoints.export_model(fit.checkpoint_uri, tmp), MODEL_ARTIFACT)
        except Exception as e:  # a convenience copy: the run and its checkpoint stand without it
            log.warning("train-%s: run %s finished, but its model could not be logged to MLflow (%s: %s); "
                        "the checkpoint %s holds it", kind, run_id, type(e).__name__, e, fit.checkpoint_uri)
    client.set_tag(run_id, STATUS_TAG, "finished" if finished else f"paused at step {fit.steps}")
    client.set_terminated(run_id, "FINISHED" if finished else "KILLED")
    return RunRef(run_id, fit.checkpoint_uri, False, fit.steps)


def run_kind(tracking_cfg: TrackingConfig, run_id: str) -> str | None:
    """``tokenizer`` or ``generator`` (tag ``c2f.kind``) of an MLflow run."""
    tracking.set_store(tracking_cfg)
    try:
        return mlflow.MlflowClient().get_run(run_id).data.tags.get("c2f.kind")
    except mlflow.exceptions.MlflowException as e:
        raise UserKeyError(f"no MLflow run {run_id} in {tracking_cfg.uri}") from e


def run_config(tracking_cfg: TrackingConfig, run_id: str) -> dict:
    """The resolved config tree a run was started with (:data:`CONFIG_ARTIFACT`)."""
    run_kind(tracking_cfg, run_id)  # one line when there is no such run
    try:
        return yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{CONFIG_ARTIFACT}"))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise UserKeyError(f"MLflow run {run_id} has no {CONFIG_ARTIFACT} (it was started before runs recorded "
                           f"their config): pass --config") from e


def finished_run(tracking_cfg: TrackingConfig, run_id: str, kind: str = "tokenizer") -> dict[str, str]:
    """The tags of a finished ``kind`` run (KeyError otherwise)."""
    found = run_kind(tracking_cfg, run_id)
    if found != kind:
        raise UserKeyError(f"MLflow run {run_id} is a {found} run, not a {kind} run")
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    if tags.get(STATUS_TAG) != "finished":
        raise UserKeyError(f"MLflow run {run_id} is not a finished {kind} run (status: {tags.get(STATUS_TAG)})")
    return tags
