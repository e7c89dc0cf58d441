"""Stages as thin functions of the typed config (used by the CLI and the Prefect flow).

They pass URIs and MLflow run ids between each other, never arrays, and reach methods only through
the registry (``train/methods``): the configured method for training, the method a checkpoint
records for everything after it.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import mlflow

from coarse2fine.evaluate import tracking
from coarse2fine.pipelines import runs
from coarse2fine.pipelines.config import Config
from coarse2fine.preprocess import schema, storage
from coarse2fine.preprocess.beam_jobs import StageResult, preprocess_all, run_image_stage
from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train.losses import PerceptualChoice, resolve_perceptual


def preprocess(cfg: Config) -> list[StageResult]:
    """The one door into preprocessing (ingest → spectral → decomposition), for the CLI and the flow;
    a storage root that cannot be written fails first, in one line."""
    storage.check_writable(cfg.storage.root)
    return preprocess_all(cfg.data, cfg.preprocess, cfg.storage)


def perceptual_choice(cfg: Config) -> PerceptualChoice:
    """The perceptual loss the configured tokenizer trains with (``auto`` resolved here: LPIPS when
    the VGG16 weights are at ``lpips_backbone`` or in torch hub's cache)."""
    import torch.hub

    t = cfg.tokenizer.train
    return resolve_perceptual(t.perceptual, t.perceptual_weight, t.lpips_backbone, torch.hub.get_dir())


def tokenizer_spec(cfg: Config) -> tuple[dict, str]:
    """What determines a trained tokenizer besides its data: the active method, its parameters,
    training (with the perceptual loss ``auto`` resolved to) and resolution, and the code version
    of the modules it runs."""
    code = storage.code_version(*cfg.tokenizer.method_plugin().code_modules())
    return cfg.tokenizer.spec() | {"resolution": cfg.data.resolution, "perceptual": perceptual_choice(cfg).kind}, code


def train_tokenizer(cfg: Config, stop_after: int | None = None, warm_start: bool = False,
                    images_uri: str | None = None) -> runs.RunRef:
    """Train (or resume, or reuse when finished) the configured tokenizer on ``images_uri`` (the
    flow passes the dataset its preprocessing step wrote; the CLI leaves it None and preprocesses
    the config's data first, reusing what is finished)."""
    from coarse2fine.train.launch import fit_tokenizer

    images_uri = images_uri or preprocess(cfg)[0].uris["images"]
    images_fp = schema.read_manifest(images_uri)["fingerprint"]
    spec, code = tokenizer_spec(cfg)
    perceptual = perceptual_choice(cfg)
    tags = {"c2f.images": images_uri, "c2f.images_fingerprint": images_fp, "c2f.perceptual": perceptual.describe(),
            tracking.PERCEPTUAL_KIND_TAG: perceptual.kind}
    decomposition_uri, data_fp = decomposition_for(cfg, images_uri), images_fp
    if decomposition_uri:  # the data is images ⋈ decomposition: both fingerprints
        data_fp = storage.fingerprint("images+decomposition", {}, [images_fp,
                                      schema.read_manifest(decomposition_uri)["fingerprint"]], "")
        tags["c2f.decomposition"] = decomposition_uri
    return runs.tracked_fit(
        cfg.tracking, cfg.model_dump(mode="json"), "tokenizer", cfg.tokenizer.method, spec, code, data_fp, tags,
        cfg.tokenizer.train.max_steps, warm_start, lambda logger, run_name, init, cont: fit_tokenizer(
            images_uri, cfg.tokenizer, cfg.data.resolution, schema.join(cfg.storage.root, "checkpoints"), run_name,
            cfg.ray, logger, stop_after, init, decomposition_uri, perceptual, cont))


def decomposition_for(cfg: Config, images_uri: str) -> str | None:
    """The ``decomposition`` dataset of ``images_uri`` (reused, or built now) when the configured
    tokenizer takes Mumford–Shah bases, after checking it serves them (order, keys); else None."""
    from coarse2fine.preprocess.beam_jobs import decomposition
    from coarse2fine.train import data

    k = cfg.tokenizer.method_plugin().factors(cfg.tokenizer.model_config_for(cfg.data.resolution))
    if not k:
        return None
    uri = decomposition(images_uri, cfg.data, cfg.preprocess, cfg.storage).uris["decomposition"]
    data.check_decomposition(images_uri, uri, k)
    return uri


def tokenize(cfg: Config, run_id: str) -> StageResult:
    """Beam job: the ``tokens/{fingerprint}`` dataset of a trained tokenizer run, in the layout its
    method declares (recorded in the manifest, ``config.layout``); codebook usage over the whole
    dataset is logged into the run (``dataset/…``)."""
    from coarse2fine.evaluate.tokenizer_eval import dataset_codebook_stats
    from coarse2fine.train import checkpoints, tokenize as tok
    from coarse2fine.train.data import decomposition_columns

    tags = runs.finished_run(cfg.tracking, run_id)
    ckpt, images_uri = tags[runs.CHECKPOINT_TAG], tags["c2f.images"]
    method, model = checkpoints.load_model(ckpt, "cpu", "tokenizer")
    layout = method.calibrate(model, method.layout(model.cfg), images_uri)
    k = method.factors(model.cfg)
    result = run_image_stage(
        "tokens", images_uri, cfg.preprocess, cfg.storage,
        {"tokenizer_run": run_id, "checkpoint": ckpt, "fingerprint": tags[runs.FINGERPRINT_TAG],
         "method": method.name, "layout_version": schema.TOKENS_LAYOUT_VERSION,
         "layout": schema.layout_to_json(layout)},
        storage.code_version(tok, checkpoints, *method.model_modules()), schema.tokens_schema(layout), tok.token_rows(ckpt),
        (tags["c2f.decomposition"], decomposition_columns(tags["c2f.decomposition"])[1]) if k else None,
    )
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "c2f.tokens", result.uris["tokens"])
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0)
                                      for k, v in dataset_codebook_stats(result.uris["tokens"]).items()])
    return result


def train_generator(cfg: Config, stop_after: int | None = None, warm_start: bool = False,
                    tokenizer_run: str | None = None, tokens_uri: str | None = None) -> runs.RunRef:
    """Train (or resume, or reuse) the configured generator on ``tokens_uri``, the token dataset of
    the finished ``tokenizer_run`` (the flow passes both from its earlier steps; the CLI leaves them
    None and trains and tokenizes the configured tokenizer first, reusing what is finished). The
    generator is sized from the dataset's token layout."""
    from coarse2fine.train.launch import fit_generator
    from coarse2fine.train.tasks import GeneratorTask

    tokenizer_run = tokenizer_run or train_tokenizer(cfg, warm_start=warm_start).run_id
    tok_tags = runs.finished_run(cfg.tracking, tokenizer_run)
    tokens_uri = tokens_uri or tokenize(cfg, tokenizer_run).uris["tokens"]
    manifest = schema.read_manifest(tokens_uri)
    made_by = manifest["config"].get("tokenizer_run")
    if made_by != tokenizer_run:
        raise UserValueError(f"{tokens_uri} holds the tokens of run {made_by}, not of tokenizer run {tokenizer_run}")
    layout = schema.layout_from_manifest(manifest, tokens_uri)
    tok_ckpt = tok_tags[runs.CHECKPOINT_TAG]
    classes = schema.read_manifest(tok_tags["c2f.images"]).get("classes") or []
    method = cfg.generator.method_plugin()
    model_cfg = method.model_config(cfg.generator.params(), layout, len(classes))
    spec = cfg.generator.spec() | {"model": asdict(model_cfg)}
    tags = {"c2f.tokenizer_run": tokenizer_run, "c2f.tokenizer_method": tok_tags["c2f.method"],
            "c2f.tokenizer_checkpoint": tok_ckpt, "c2f.tokens": tokens_uri,
            "c2f.images": tok_tags["c2f.images"], "c2f.classes": json.dumps(classes)}
    task = GeneratorTask(method, model_cfg, cfg.generator.train, layout, tok_ckpt)
    return runs.tracked_fit(
        cfg.tracking, cfg.model_dump(mode="json"), "generator", method.name, spec,
        storage.code_version(*method.code_modules()), manifest["fingerprint"], tags, cfg.generator.train.max_steps,
        warm_start, lambda logger, run_name, init, cont: fit_generator(
            tokens_uri, task, schema.join(cfg.storage.root, "checkpoints"), run_name, cfg.ray, logger, stop_after,
            init, cont))


def sample_settings(cfg: Config, **overrides):
    """The generator section's sampling settings with the non-None ``overrides`` applied."""
    from coarse2fine.train.methods.base import SampleSettings

    base = {k: getattr(cfg.generator, k) for k in ("guidance", "temperature", "top_k", "top_p", "steps")}
    return SampleSettings(**(base | {k: v for k, v in overrides.items() if v is not None}))


def evaluate_tokenizer(cfg: Config, run_id: str) -> list[dict]:
    """Per-resolution reconstruction table of a trained tokenizer, logged into its MLflow run."""
    from coarse2fine.evaluate.tokenizer_eval import evaluate_checkpoint

    tags = runs.finished_run(cfg.tracking, run_id)
    report = evaluate_checkpoint(tags[runs.CHECKPOINT_TAG], tags["c2f.images"], cfg.evaluate,
                                 decomposition_uri=tags.get("c2f.decomposition"))
    client = mlflow.MlflowClient()
    for row in report.rows:
        res = row["resolution"]
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"eval/{k}_{res}px", float(v), 0, 0)
                                          for k, v in row.items() if k != "resolution" and v == v])
    top = report.rows[0]
    # NaN where a number does not exist (rFID of < 2 images, SSIM below its window): a re-evaluation
    # must not leave the previous protocol's value as the latest
    headline = {k: top.get(k, float("nan")) for k in ("psnr", "ssim", "l1", "rfid")}
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in
                                      (headline | report.codebook | report.summary | {"rfid_n": top["n"]}).items()])
    with mlflow.start_run(run_id=run_id):
        tracking.log_table(report.rows, "eval/per_resolution.json")
        tracking.log_image_grid(report.grid, "eval/reconstructions.png", row_labels=["original", "reconstruction"])
    _tag_evaluation(cfg, run_id, "tokenizer", tags["c2f.method"])
    return report.rows


def evaluate_generator(cfg: Config, run_id: str) -> dict[str, list[dict]]:
    """SIT Table 2 / Table 4 in miniature (see ``evaluate/generator_eval.py``), logged into the run."""
    from coarse2fine.evaluate.fid import resolve_device
    from coarse2fine.train.checkpoints import load_pair

    tags = runs.finished_run(cfg.tracking, run_id, "generator")
    pair = load_pair(tags[runs.CHECKPOINT_TAG], tags["c2f.tokenizer_checkpoint"], resolve_device(cfg.evaluate.device))
    report = pair.method.evaluate(pair, tags["c2f.images"], cfg.evaluate, sample_settings(cfg),
                                  cfg.generator.eval_samples, cfg.evaluate.seed)
    client = mlflow.MlflowClient()
    metrics = [mlflow.entities.Metric(f"eval/{k}_{report.prefix}{row[report.key]}", float(v), 0, 0)
               for row in report.rows for k, v in row.items() if k != report.key and v == v]
    metrics += [mlflow.entities.Metric(f"eval/upsample_{k}_from{row['input_resolution']}px", float(v), 0, 0)
                for row in report.upsampling for k, v in row.items() if k != "input_resolution" and v == v]
    client.log_batch(run_id, metrics=metrics)
    # the headline (compared across methods): the full stop scale (AR-SIT), one token per step
    # (MaskGIT), every map (CART), MAR's default steps, every frequency level (FAR)
    headline = report.rows[-1]
    settings = sample_settings(cfg)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in {
        "fid": headline.get("fid", float("nan")), "kid": headline.get("kid", float("nan")), "fid_n": headline["n"],
        "images_per_s": headline["images_per_s"], "forward_passes": headline["forward_passes"],
        "diffusion_passes": headline.get("diffusion_passes", 0), "cfg_scale": settings.guidance,
        "eval_batch_size": cfg.evaluate.batch_size,
        "num_params": sum(p.numel() for p in pair.generator.parameters())}.items()])
    with mlflow.start_run(run_id=run_id):
        tracking.log_table(report.rows, f"eval/{report.table}.json")
        # one row per setting (stop scale, steps, maps)
        tracking.log_image_grid(report.samples_grid, f"eval/samples_per_{report.key}.png",
                                row_labels=[_setting_label(report.key, row) for row in report.rows])
        if report.upsampling:
            tracking.log_table(report.upsampling, "eval/upsampling.json")
            low = report.upsampling[-1]["input_resolution"]  # the grid shows the hardest case
            tracking.log_image_grid(report.upsampling_grid, "eval/upsampling.png",
                                    row_labels=[f"input {low}px", "upsampled", "original"])
    # what this pair cannot do is named, not raised (e.g. stop scales over a dense-decoder tokenizer)
    for table, why in report.not_applicable.items():
        client.set_tag(run_id, f"c2f.not_applicable.{table}", why)
    _tag_evaluation(cfg, run_id, "generator", tags["c2f.method"], tags["c2f.tokenizer_method"])
    return {report.table: report.rows, "upsampling": report.upsampling,
            "not applicable": [{"table": t, "why": why} for t, why in report.not_applicable.items()]}


def _setting_label(key: str, row: dict) -> str:
    """A grid row's label: ``stop scale 2 (32px)``, ``8 steps``, ``10 maps``."""
    if key == "stop_scale":
        return f"stop scale {row['stop_scale']} ({row['resolution']}px)"
    return f"{row[key]} {key.replace('_', ' ')}"


def protocol_fingerprint(cfg: Config, kind: str) -> str:
    """The evaluation protocol shared by every method: the evaluation settings (images, Inception,
    FID/KID subsets) and, for generators, the sampling settings and the number of samples. Runs
    compared side by side must share it (``c2f.eval_protocol``)."""
    return storage.fingerprint(f"protocol-{kind}", _protocol_settings(cfg, kind), [], "")


def _protocol_settings(cfg: Config, kind: str) -> dict:
    settings = cfg.evaluate.model_dump(exclude={"device"})
    if kind == "generator":
        settings |= {"sampling": asdict(sample_settings(cfg)), "eval_samples": cfg.generator.eval_samples}
    return settings


def _tag_evaluation(cfg: Config, run_id: str, kind: str, method: str, tokenizer_method: str | None = None) -> None:
    """Mark ``run_id`` evaluated: the protocol with the methods' code (reuse), the protocol alone
    (comparison) and the machine its images/s were measured on."""
    from coarse2fine.evaluate.fid import machine, resolve_device

    client = mlflow.MlflowClient()
    client.set_tag(run_id, tracking.PROTOCOL_TAG, protocol_fingerprint(cfg, kind))
    client.set_tag(run_id, tracking.MACHINE_TAG, machine(resolve_device(cfg.evaluate.device)))
    client.set_tag(run_id, runs.EVALUATED_TAG, evaluation_fingerprint(cfg, kind, method, tokenizer_method))


def evaluation_fingerprint(cfg: Config, kind: str, method: str, tokenizer_method: str | None = None) -> str:
    """The evaluation protocol of a run of ``kind`` and ``method`` with the code that ran it (a
    generator's also depends on its tokenizer's method: the methods' code decides how images are
    reconstructed, sampled and decoded)."""
    from coarse2fine.evaluate import fid, generator_eval, metrics, tokenizer_eval
    from coarse2fine.train import methods

    settings = _protocol_settings(cfg, kind)
    used = [methods.get(kind, method)] + ([methods.tokenizer(tokenizer_method)] if tokenizer_method else [])
    code = storage.code_version(fid, generator_eval, metrics, tokenizer_eval, *(m for u in used for m in u.model_modules()))
    return storage.fingerprint(f"evaluate-{kind}", settings, [], code)


def evaluation_done(cfg: Config, run_id: str) -> bool:
    """Whether the run already holds an evaluation with this config's protocol."""
    kind = runs.run_kind(cfg.tracking, run_id)
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    return tags.get(runs.EVALUATED_TAG) == evaluation_fingerprint(cfg, kind, tags["c2f.method"],
                                                                  tags.get("c2f.tokenizer_method"))


def evaluate(cfg: Config, run_id: str):
    """Evaluate a finished tokenizer or generator run (by its ``c2f.kind`` tag)."""
    if runs.run_kind(cfg.tracking, run_id) == "generator":
        return evaluate_generator(cfg, run_id)
    return evaluate_tokenizer(cfg, run_id)


SUMMARY_METRICS = ("psnr", "ssim", "rfid", "fid")
"""The key metrics of the end-of-flow report (printed with ``compare.BETTER``'s direction)."""
SAMPLE_COUNTS = {"rfid": "rfid_n", "fid": "fid_n"}


def run_summary(cfg: Config, run_id: str) -> dict:
    """Kind, key metrics and sample-grid locations of a run (for the end-of-flow report)."""
    kind = runs.run_kind(cfg.tracking, run_id)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    grids = [f"{run.info.artifact_uri}/{a.path}" for a in client.list_artifacts(run_id, "eval") if a.path.endswith(".png")]
    m = run.data.metrics
    return {"kind": kind, "run_id": run_id, "grids": grids,
            "metrics": {k: m[k] for k in SUMMARY_METRICS if k in m and m[k] == m[k]},
            "n": {k: int(m[n]) for k, n in SAMPLE_COUNTS.items() if k in m and n in m}}


