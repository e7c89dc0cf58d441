"""Stages as plain functions of the typed config (used by the CLI and the Prefect flow).

They pass URIs and MLflow run ids between each other, never arrays.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import mlflow

from coarse2fine.evaluate import tracking
from coarse2fine.evaluate.tracking import MlflowLogger
from coarse2fine.pipelines.config import Config
from coarse2fine.preprocess import schema, storage
from coarse2fine.preprocess.beam_jobs import StageResult, preprocess_all, run_image_stage
from coarse2fine.train.losses import PERCEPTUAL_OFF

log = logging.getLogger(__name__)
FINGERPRINT_TAG = "c2f.fingerprint"
LINEAGE_TAG = "c2f.lineage"  # fingerprint without the data: runs a warm start may continue
DATA_TAG = "c2f.data_fingerprint"  # the dataset a run trained on
EVALUATED_TAG = "c2f.evaluated"  # fingerprint of the evaluation protocol last logged into a run
# training settings that change how a run is executed or logged, not what it computes: not fingerprinted
RUN_ONLY_KEYS = {"log_every", "sample_every", "checkpoint_every", "torch_threads"}


def preprocess(cfg: Config) -> list[StageResult]:
    return preprocess_all(cfg.data, cfg.preprocess, cfg.storage)


def tokenizer_spec(cfg: Config) -> tuple[dict, str]:
    """What determines a trained tokenizer besides its data: config, optimisation, code version."""
    from coarse2fine.train import data, launch, losses, steps
    from coarse2fine.train.models import blocks, quantizer, sit

    train = cfg.train.model_dump(exclude=RUN_ONLY_KEYS)
    code = storage.code_version(data, launch, losses, steps, blocks, quantizer, sit)
    return {"tokenizer": cfg.tokenizer.model_dump(), "train": train, "resolution": cfg.data.resolution}, code


def _find_run(cfg: Config, tags: dict[str, str]) -> mlflow.entities.Run | None:
    """The latest run of the experiment carrying all ``tags``."""
    tracking.configure(cfg.tracking)
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], filter_string=where, max_results=1,
                              order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0] if runs else None


def _tracked_fit(cfg: Config, kind: str, method: str, spec: dict, code: str, data_fp: str, tags: dict[str, str],
                 max_steps: int, warm_start: bool, fit_fn) -> dict[str, str]:
    """The MLflow bookkeeping every trained model shares.

    Fingerprint = hash(kind, ``spec``, data fingerprint, code). A finished run with it is reused, a
    paused or killed one resumed (same MLflow run, same Ray run name), otherwise a new run starts.
    ``warm_start`` (nightly retraining): the new run starts from the weights of the latest finished
    run of the same lineage (same spec and code, any data) — or that run is reused when it already
    saw this data. ``fit_fn(logger, run_name, init_checkpoint)`` trains and returns a
    :class:`train.launch.FitResult`.
    """
    lineage = storage.fingerprint(kind, spec, [], code)
    init = _find_run(cfg, {LINEAGE_TAG: lineage, "c2f.status": "finished"}) if warm_start else None
    if init is not None and init.data.tags.get(DATA_TAG) == data_fp:
        log.info("train-%s: reusing run %s, it already saw this data", kind, init.info.run_id)
        return {"run_id": init.info.run_id, "checkpoint": init.data.tags["c2f.checkpoint"], "reused": "yes"}
    fp = storage.fingerprint(kind, spec, [data_fp] + ([init.data.tags[FINGERPRINT_TAG]] if init else []), code)
    run_name = f"{kind}-{method}-{fp}"
    run = _find_run(cfg, {FINGERPRINT_TAG: fp})
    client = mlflow.MlflowClient()
    if run is not None and run.data.tags.get("c2f.status") == "finished":
        log.info("train-%s: reusing finished run %s", kind, run.info.run_id)
        return {"run_id": run.info.run_id, "checkpoint": run.data.tags["c2f.checkpoint"], "reused": "yes"}
    if run is None:
        tags = {FINGERPRINT_TAG: fp, LINEAGE_TAG: lineage, DATA_TAG: data_fp, "c2f.kind": kind, "c2f.method": method,
                **tags, **({"c2f.warm_start_from": init.info.run_id} if init else {})}
        with tracking.run(cfg.tracking, run_name=run_name, tags=tags) as active:
            tracking.log_config(cfg.model_dump(mode="json"))
            run_id = active.info.run_id
        client.set_terminated(run_id, "RUNNING")
        if init:
            log.info("train-%s: warm start from run %s", kind, init.info.run_id)
    else:
        run_id = run.info.run_id
        log.info("train-%s: resuming run %s from its last checkpoint", kind, run_id)
    try:
        fit = fit_fn(MlflowLogger(cfg.tracking, run_id), run_name, init.data.tags["c2f.checkpoint"] if init else None)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_tag(run_id, "c2f.checkpoint", fit.checkpoint_uri)
    finished = fit.steps >= max_steps
    client.set_tag(run_id, "c2f.status", "finished" if finished else f"paused at step {fit.steps}")
    client.set_terminated(run_id, "FINISHED" if finished else "KILLED")
    return {"run_id": run_id, "checkpoint": fit.checkpoint_uri, "reused": "no", "steps": str(fit.steps)}


def train_tokenizer(cfg: Config, stop_after: int | None = None, warm_start: bool = False,
                    images_uri: str | None = None) -> dict[str, str]:
    """Train (or resume, or reuse when finished) the configured tokenizer on ``images_uri`` (the
    flow passes the dataset its preprocessing step wrote; the CLI leaves it None and preprocesses
    the config's data first, reusing what is finished); returns run id and checkpoint."""
    from coarse2fine.train.launch import fit_tokenizer

    images_uri = images_uri or preprocess(cfg)[0].uris["images"]
    images_fp = schema.read_manifest(images_uri)["fingerprint"]
    spec, code = tokenizer_spec(cfg)
    tags = {"c2f.images": images_uri, "c2f.images_fingerprint": images_fp, "c2f.perceptual": PERCEPTUAL_OFF}
    return _tracked_fit(cfg, "tokenizer", cfg.tokenizer.method, spec, code, images_fp, tags, cfg.train.max_steps,
                        warm_start, lambda logger, run_name, init: fit_tokenizer(
                            images_uri, cfg.tokenizer, cfg.train, cfg.data.resolution,
                            storage.join(cfg.storage.root, "checkpoints"), run_name, cfg.ray, logger, stop_after, init))


def run_kind(cfg: Config, run_id: str) -> str | None:
    """``tokenizer`` or ``generator`` (tag ``c2f.kind``) of an MLflow run."""
    tracking.set_store(cfg.tracking)
    try:
        return mlflow.MlflowClient().get_run(run_id).data.tags.get("c2f.kind")
    except mlflow.exceptions.MlflowException as e:
        raise KeyError(f"no MLflow run {run_id} in {cfg.tracking.uri}") from e


def _finished_run(cfg: Config, run_id: str, kind: str = "tokenizer") -> tuple[mlflow.MlflowClient, dict[str, str]]:
    """The MLflow client and the tags of a finished ``kind`` run (KeyError otherwise)."""
    if run_kind(cfg, run_id) != kind:
        raise KeyError(f"MLflow run {run_id} is a {run_kind(cfg, run_id)} run, not a {kind} run")
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    if tags.get("c2f.kind") != kind or tags.get("c2f.status") != "finished":
        raise KeyError(f"MLflow run {run_id} is not a finished {kind} run "
                       f"(kind: {tags.get('c2f.kind')}, status: {tags.get('c2f.status')})")
    return client, tags


def evaluate_tokenizer(cfg: Config, run_id: str) -> list[dict]:
    """Per-resolution reconstruction table of a trained tokenizer, logged into its MLflow run."""
    from coarse2fine.evaluate.tokenizer_eval import evaluate_checkpoint

    client, tags = _finished_run(cfg, run_id)
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
    client.set_tag(run_id, EVALUATED_TAG, evaluation_fingerprint(cfg, "tokenizer"))
    return report.rows


def tokenize(cfg: Config, run_id: str) -> StageResult:
    """Beam job: the ``tokens/{fingerprint}`` dataset (ids per scale) of a trained tokenizer run."""
    from coarse2fine.train import tokenize as tok
    from coarse2fine.train.models import io, sit
    from coarse2fine.train.models.io import load_tokenizer

    client, tags = _finished_run(cfg, run_id)
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


def generator_spec(cfg: Config, model_cfg) -> tuple[dict, str]:
    """What determines a trained generator besides its tokens: model, optimisation, code (sampling
    settings and logging cadence do not)."""
    from coarse2fine.train import data, launch, sampling, steps
    from coarse2fine.train.models import arsit

    train = cfg.generator.train.model_dump(exclude=RUN_ONLY_KEYS)
    return {"model": asdict(model_cfg), "train": train}, storage.code_version(data, launch, steps, sampling, arsit)


def train_generator(cfg: Config, stop_after: int | None = None, warm_start: bool = False,
                    tokenizer_run: str | None = None, tokens_uri: str | None = None) -> dict[str, str]:
    """Train (or resume, or reuse) the configured generator on ``tokens_uri``, the token dataset of
    the finished ``tokenizer_run`` (the flow passes both from its earlier steps; the CLI leaves them
    None and trains and tokenizes the configured tokenizer first, reusing what is finished)."""
    from coarse2fine.train.launch import fit_generator
    from coarse2fine.train.models.arsit import ARSITConfig
    from coarse2fine.train.models.io import load_tokenizer

    tokenizer_run = tokenizer_run or train_tokenizer(cfg, warm_start=warm_start)["run_id"]
    _, tok_tags = _finished_run(cfg, tokenizer_run)
    tokens_uri = tokens_uri or tokenize(cfg, tokenizer_run).uris["tokens"]
    made_by = schema.read_manifest(tokens_uri)["config"].get("tokenizer_run")
    if made_by != tokenizer_run:
        raise ValueError(f"{tokens_uri} holds the tokens of run {made_by}, not of tokenizer run {tokenizer_run}")
    tok = {"run_id": tokenizer_run, "checkpoint": tok_tags["c2f.checkpoint"]}
    tok_cfg = load_tokenizer(tok["checkpoint"]).cfg
    classes = schema.read_manifest(tok_tags["c2f.images"]).get("classes") or []
    model_cfg = ARSITConfig(tok_cfg.num_scales, tok_cfg.tokens_per_scale, tok_cfg.codebook_size, len(classes),
                            cfg.generator.size, cond_drop_prob=cfg.generator.cond_drop_prob)
    spec, code = generator_spec(cfg, model_cfg)
    tags = {"c2f.tokenizer_run": tok["run_id"], "c2f.tokenizer_checkpoint": tok["checkpoint"], "c2f.tokens": tokens_uri,
            "c2f.images": tok_tags["c2f.images"], "c2f.classes": json.dumps(classes)}
    return _tracked_fit(cfg, "generator", cfg.generator.method, spec, code, schema.read_manifest(tokens_uri)["fingerprint"],
                        tags, cfg.generator.train.max_steps, warm_start, lambda logger, run_name, init: fit_generator(
                            tokens_uri, model_cfg, cfg.generator.train, tok["checkpoint"],
                            storage.join(cfg.storage.root, "checkpoints"), run_name, cfg.ray, logger, stop_after, init))


def sample_settings(cfg: Config, **overrides):
    """The generator section's sampling settings with the non-None ``overrides`` applied."""
    from coarse2fine.train.generate import SampleSettings

    base = {k: getattr(cfg.generator, k) for k in ("guidance", "temperature", "top_k", "top_p")}
    return SampleSettings(**(base | {k: v for k, v in overrides.items() if v is not None}))


def evaluate_generator(cfg: Config, run_id: str) -> dict[str, list[dict]]:
    """SIT Table 2 / Table 4 in miniature (see ``evaluate/generator_eval.py``), logged into the run."""
    from coarse2fine.evaluate.generator_eval import evaluate_generator as run_eval

    client, tags = _finished_run(cfg, run_id, "generator")
    report = run_eval(tags["c2f.checkpoint"], tags["c2f.tokenizer_checkpoint"], tags["c2f.images"], cfg.evaluate,
                      sample_settings(cfg), cfg.generator.eval_samples, cfg.evaluate.seed)
    metrics = [mlflow.entities.Metric(f"eval/{k}_stop{row['stop_scale']}", float(v), 0, 0)
               for row in report.stop_scales for k, v in row.items() if k != "stop_scale" and v == v]
    metrics += [mlflow.entities.Metric(f"eval/upsample_{k}_from{row['input_resolution']}px", float(v), 0, 0)
                for row in report.upsampling for k, v in row.items() if k != "input_resolution" and v == v]
    client.log_batch(run_id, metrics=metrics)
    if "fid" in report.stop_scales[-1]:
        client.log_metric(run_id, "fid", float(report.stop_scales[-1]["fid"]))
    with mlflow.start_run(run_id=run_id):
        tracking.log_table(report.stop_scales, "eval/stop_scales.json")
        # one row per stop scale / per kind of image (input, upsampled, original)
        tracking.log_image_grid(report.samples_grid, "eval/samples_per_stop_scale.png",
                                nrow=len(report.samples_grid) // len(report.stop_scales))
        if report.upsampling:
            tracking.log_table(report.upsampling, "eval/upsampling.json")
            tracking.log_image_grid(report.upsampling_grid, "eval/upsampling.png", nrow=len(report.upsampling_grid) // 3)
    client.set_tag(run_id, EVALUATED_TAG, evaluation_fingerprint(cfg, "generator"))
    return {"stop_scales": report.stop_scales, "upsampling": report.upsampling}


def evaluation_fingerprint(cfg: Config, kind: str) -> str:
    """The evaluation protocol of a run kind (the generator's also depends on its sampling settings)."""
    from coarse2fine.evaluate import fid, generator_eval, metrics, tokenizer_eval

    settings = cfg.evaluate.model_dump(exclude={"device"})
    if kind == "generator":
        settings |= {"sampling": asdict(sample_settings(cfg)), "eval_samples": cfg.generator.eval_samples}
    return storage.fingerprint(f"evaluate-{kind}", settings, [],
                               storage.code_version(fid, generator_eval, metrics, tokenizer_eval))


def evaluation_done(cfg: Config, run_id: str) -> bool:
    """Whether the run already holds an evaluation with this config's protocol."""
    kind = run_kind(cfg, run_id)
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    return tags.get(EVALUATED_TAG) == evaluation_fingerprint(cfg, kind)


def evaluate(cfg: Config, run_id: str):
    """Evaluate a finished tokenizer or generator run (by its ``c2f.kind`` tag)."""
    if run_kind(cfg, run_id) == "generator":
        return evaluate_generator(cfg, run_id)
    return evaluate_tokenizer(cfg, run_id)


SUMMARY_METRICS = ("psnr", "ssim", "rfid", "fid")
GRIDS = {"tokenizer": ("eval/reconstructions.png",),
         "generator": ("eval/samples_per_stop_scale.png", "eval/upsampling.png")}


def run_summary(cfg: Config, run_id: str) -> dict:
    """Kind, key metrics and sample-grid locations of a run (for the end-of-flow report)."""
    kind = run_kind(cfg, run_id)
    run = mlflow.MlflowClient().get_run(run_id)
    grids = [f"{run.info.artifact_uri}/{g}" for g in GRIDS.get(kind, ())]
    return {"kind": kind, "run_id": run_id, "grids": grids,
            "metrics": {k: run.data.metrics[k] for k in SUMMARY_METRICS if k in run.data.metrics}}


def _save_grid(images_NCHW, out: str, run_id: str, nrow: int | None = None) -> None:
    """Write a PNG grid to ``out`` and log it to the run under ``samples/``."""
    from PIL import Image

    Image.fromarray(tracking.image_grid(images_NCHW, nrow)).save(out)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(out, "samples")


def _load_pair(cfg: Config, run_id: str, device):
    from coarse2fine.train.models.io import load_generator, load_tokenizer

    _, tags = _finished_run(cfg, run_id, "generator")
    return (load_generator(tags["c2f.checkpoint"], device), load_tokenizer(tags["c2f.tokenizer_checkpoint"], device),
            json.loads(tags.get("c2f.classes", "[]")))


def class_id(label: str | None, classes: list[str], null_class: int) -> int:
    """A class given by name or index (None = the null class, unconditional)."""
    if label is None:
        return null_class
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < null_class:  # null_class = number of classes
        return int(label)
    raise KeyError(f"unknown class {label!r}; known: {', '.join(classes) or 'none (unconditional model)'}")


def generate(cfg: Config, run_id: str, n: int, label: str | None, stop_scale: int | None, seed: int, out: str,
             **settings) -> dict:
    """Sample ``n`` images (stopped after ``stop_scale``), write the grid PNG and the token ids
    (``{out}.tokens.npz``, the input of :func:`refine`), log both to the generator's run."""
    import torch

    from coarse2fine.evaluate.fid import resolve_device
    from coarse2fine.train.generate import generate as sample

    device = resolve_device(cfg.evaluate.device)
    gen, tok, classes = _load_pair(cfg, run_id, device)
    cond = torch.full((n,), class_id(label, classes, gen.cfg.null_class), device=device)
    ids, images = sample(gen, tok, cond, stop_scale, sample_settings(cfg, **settings), seed)
    return _save_samples(ids, cond, images, run_id, seed, out)


def _save_samples(ids, cond, images, run_id: str, seed: int, out: str) -> dict:
    """The grid PNG ``out`` and the token ids ``{out}.tokens.npz`` (what :func:`refine` continues),
    both logged to the generator's run under ``samples/``."""
    import numpy as np

    tokens_file = f"{out}.tokens.npz"
    np.savez(tokens_file, ids=ids.cpu().numpy(), classes=cond.cpu().numpy(), run_id=run_id, seed=seed)
    _save_grid(images.float().cpu().numpy(), out, run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(tokens_file, "samples")
    return {"grid": out, "tokens": tokens_file, "resolution": images.shape[-1], "num_tokens": ids.shape[1]}


def refine(cfg: Config, run_id: str, tokens_file: str, select: list[int] | None, stop_scale: int | None,
           seed: int, out: str, **settings) -> dict:
    """Continue saved partial sequences (all, or the ``select``-ed rows) to ``stop_scale``."""
    import numpy as np
    import torch

    from coarse2fine.evaluate.fid import resolve_device
    from coarse2fine.train.generate import generate as sample

    device = resolve_device(cfg.evaluate.device)
    gen, tok, _ = _load_pair(cfg, run_id, device)
    saved = np.load(tokens_file)
    rows = select if select else list(range(len(saved["ids"])))
    if max(rows) >= len(saved["ids"]):
        raise KeyError(f"{tokens_file} holds {len(saved['ids'])} sequences; --select {max(rows)} is out of range")
    prefix = torch.from_numpy(saved["ids"][rows]).to(device)
    cond = torch.from_numpy(saved["classes"][rows]).to(device)
    ids, images = sample(gen, tok, cond, stop_scale, sample_settings(cfg, **settings), seed, prefix)
    return _save_samples(ids, cond, images, run_id, seed, out)


def _read_images(paths: list[str], resolution: int | None):
    """Image files → (B, 3, r, r) in [0, 1]; every file must be square with the same side."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if resolution and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, np.float32).transpose(2, 0, 1) / 255)
    if len({a.shape for a in arrays}) != 1 or arrays[0].shape[1] != arrays[0].shape[2]:
        raise ValueError("images must be square and of one size")
    return torch.from_numpy(np.stack(arrays))


def upsample(cfg: Config, run_id: str, images: list[str], label: str | None, seed: int, out: str, **settings) -> dict:
    """Low-resolution images (side R/2^k) → full resolution; grid rows: input (nearest), output."""
    import torch
    import torch.nn.functional as F

    from coarse2fine.evaluate.fid import resolve_device
    from coarse2fine.train.generate import upsample as run_upsample

    device = resolve_device(cfg.evaluate.device)
    gen, tok, classes = _load_pair(cfg, run_id, device)
    low = _read_images(images, None).to(device)
    tok.scales_for(low.shape[-1])  # ValueError when the side is not R/2^k
    cond = torch.full((len(low),), class_id(label, classes, gen.cfg.null_class), device=device)
    _, up = run_upsample(gen, tok, low, cond, sample_settings(cfg, **settings), seed)
    R = up.shape[-1]
    grid = torch.cat([F.interpolate(low, size=(R, R), mode="nearest"), up]).float().cpu().numpy()
    _save_grid(grid, out, run_id, nrow=len(low))
    return {"grid": out, "input_resolution": low.shape[-1], "resolution": R}


def edit(cfg: Config, run_id: str, images: list[str], keep_scales: int, label: str | None, seed: int, out: str,
         **settings) -> dict:
    """Keep the first scales of each image, regenerate the rest under ``label``; grid rows: input,
    its kept scales decoded, the edit."""
    import torch
    import torch.nn.functional as F

    from coarse2fine.evaluate.fid import resolve_device
    from coarse2fine.train.generate import decode, edit as run_edit, encode_prefix

    device = resolve_device(cfg.evaluate.device)
    gen, tok, classes = _load_pair(cfg, run_id, device)
    x = _read_images(images, tok.cfg.resolution).to(device)
    cond = torch.full((len(x),), class_id(label, classes, gen.cfg.null_class), device=device)
    _, edited = run_edit(gen, tok, x, keep_scales, cond, sample_settings(cfg, **settings), seed)
    kept = F.interpolate(decode(tok, encode_prefix(tok, x, keep_scales)), size=x.shape[-2:], mode="nearest")
    _save_grid(torch.cat([x, kept, edited]).float().cpu().numpy(), out, run_id, nrow=len(x))
    return {"grid": out, "keep_scales": keep_scales}
