"""The Prefect flow ``full-pipeline``: preprocess → train tokenizer → evaluate it → tokenize →
train generator → evaluate it.

Each task is a few lines around a plain function of ``pipelines.stages`` and returns URIs, run ids
and metrics, never arrays. Every stage is fingerprinted by its config, inputs and code, so a
re-run reuses what is complete (each task logs "reused …") and a crashed or failed run resumes:
datasets without a manifest are rebuilt, paused or killed training runs continue from their last
checkpoint in the same MLflow run. Tasks retry only on transient errors (I/O, network, Ray worker
loss); a user error (bad config, missing data) fails the flow run at once with its message.

The method is a config choice (``tokenizer.method``, ``generator.method``), not a different flow.
Deployments (``infra/prefect.yaml``, ``c2f deploy``) run this flow by module path, so workers use
the installed package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from coarse2fine.pipelines import stages
from coarse2fine.pipelines.config import Config, load_config
from coarse2fine.pipelines.runs import RunRef

RETRIES = 2
RETRY_DELAY_S = 10


def _transient(task_, task_run, state) -> bool:
    """Retry I/O, network, GCS (429/5xx, once gcsfs's own retries gave up) and Ray worker
    failures; never user errors (they would fail again)."""
    from gcsfs.retry import HttpError, is_retriable
    from ray.exceptions import RayError
    from ray.train import TrainingFailedError

    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return False
    except HttpError as e:
        return is_retriable(e)
    except (OSError, TimeoutError, RayError, TrainingFailedError):
        return True
    except BaseException:  # noqa: BLE001 - everything else is not worth a retry
        return False
    return False


def _task(name: str, **options):
    return task(name=name, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_transient,
                cache_policy=NO_CACHE, **options)


@_task("demo-data")
def demo_data_task(cfg: Config, n: int) -> str:
    """Write ``n`` demo photographs to ``data.source`` when it is missing or empty (embedded default)."""
    from coarse2fine.preprocess.demo_data import write_demo_folder
    from coarse2fine.preprocess.storage import url_to_fs

    fs, path = url_to_fs(cfg.data.source)
    if fs.exists(path) and fs.ls(path):
        get_run_logger().info("demo data: %s is not empty, using it as is", cfg.data.source)
        return cfg.data.source
    write_demo_folder(cfg.data.source, n, cfg.data.resolution)
    get_run_logger().info("demo data: wrote %d photographs to %s", n, cfg.data.source)
    return cfg.data.source


@_task("preprocess")
def preprocess_task(cfg: Config) -> list[dict[str, Any]]:
    results = stages.preprocess(cfg)
    log = get_run_logger()
    for r in results:
        log.info("%s: %s %s", r.stage, "reused" if r.reused else f"built in {r.seconds:.0f}s", r.uris)
    if results[0].counts:
        log.info("ingest counts: %s", results[0].counts)
    return [{"dataset": name, "uri": uri, "rows": r.rows[name], "reused": r.reused}
            for r in results for name, uri in r.uris.items()]


@_task("train", task_run_name="train-{kind}")
def train_task(cfg: Config, kind: str, warm_start: bool, inputs: dict[str, str]) -> RunRef:
    """Train (resume, reuse) the tokenizer or the generator on the ``inputs`` (dataset URIs, run ids)
    the earlier steps of this flow run produced."""
    fit = {"tokenizer": stages.train_tokenizer, "generator": stages.train_generator}[kind]
    res = fit(cfg, warm_start=warm_start, **inputs)
    get_run_logger().info("%s: %s run %s", kind, "reused finished" if res.reused else "trained", res.run_id)
    return res


@_task("tokenize")
def tokenize_task(cfg: Config, tokenizer_run: str) -> dict[str, Any]:
    r = stages.tokenize(cfg, tokenizer_run)
    get_run_logger().info("tokens: %s %s", "reused" if r.reused else "built", r.uris["tokens"])
    return {"dataset": "tokens", "uri": r.uris["tokens"], "rows": r.rows["tokens"], "reused": r.reused}


@_task("evaluate")
def evaluate_task(cfg: Config, run_id: str) -> dict[str, Any]:
    """Evaluate a tokenizer or generator run unless it was already evaluated with this protocol."""
    reused = stages.evaluation_done(cfg, run_id)
    if reused:
        get_run_logger().info("evaluate: reused the evaluation already logged in run %s", run_id)
    else:
        stages.evaluate(cfg, run_id)
    return stages.run_summary(cfg, run_id) | {"reused": reused}


@flow(name="full-pipeline")
def full_pipeline(config: list[str] | str = "configs/demo.yaml", overrides: list[str] | None = None,
                  demo_images: int = 0, retrain: bool = False) -> dict[str, Any]:
    """Run every stage for one config (YAML path(s), later files override earlier ones, then
    ``dotted.key=value`` overrides). ``demo_images > 0`` fills an empty ``data.source`` with demo
    photographs first. ``retrain`` (the nightly deployment): models whose data changed continue
    from the latest finished run of the same config instead of starting from scratch (ingest
    always reads only inputs it has not seen). Returns (and logs) datasets with row counts, MLflow runs with their key
    metrics, and where the sample grids are."""
    cfg = load_config([str(Path(p)) for p in ([config] if isinstance(config, str) else config)], overrides or [])
    if demo_images:
        demo_data_task(cfg, demo_images)
    datasets = preprocess_task(cfg)
    images_uri = next(d["uri"] for d in datasets if d["dataset"] == "images")
    tok = train_task(cfg, "tokenizer", retrain, {"images_uri": images_uri})
    tok_eval = evaluate_task(cfg, tok.run_id)
    tokens = tokenize_task(cfg, tok.run_id)
    datasets.append(tokens)
    gen = train_task(cfg, "generator", retrain, {"tokenizer_run": tok.run_id, "tokens_uri": tokens["uri"]})
    gen_eval = evaluate_task(cfg, gen.run_id)
    summary = {"datasets": datasets, "runs": [tok_eval | {"trained": not tok.reused, "method": cfg.tokenizer.method},
                                              gen_eval | {"trained": not gen.reused, "method": cfg.generator.method}],
               "tracking_uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment}
    get_run_logger().info("summary\n%s", format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The short report printed at the end of a run."""
    lines = ["datasets:"]
    for d in summary["datasets"]:
        lines.append(f"  {d['dataset']:<14} {d['rows']:>7} rows  {'reused' if d['reused'] else 'built '}  {d['uri']}")
    lines.append(f"MLflow runs ({summary['tracking_uri']}, experiment {summary['experiment']}):")
    for r in summary["runs"]:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items())
        lines.append(f"  {r['kind']:<10} {r.get('method', ''):<8} {r['run_id']}  "
                     f"{'trained' if r['trained'] else 'reused '}  {metrics}")
        for g in r["grids"]:
            lines.append(f"             grid: {g}")
    lines.append(f"browse: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return "\n".join(lines)
