"""The Prefect flow ``full-pipeline``: preprocess once, then per tokenizer:generator pair train
the tokenizer → evaluate it → tokenize → train the generator → evaluate it, and end with the
side-by-side method table.

Each task is a few lines around a plain function of ``pipelines.stages`` and returns URIs, run ids
and metrics, never arrays. Every stage is fingerprinted by its config, inputs and code, so a
re-run reuses what is complete (each task logs "reused …") and a crashed or failed run resumes:
datasets without a manifest are rebuilt, paused or killed training runs continue from their last
checkpoint in the same MLflow run. Tasks retry only on transient errors (I/O, network, Ray worker
loss); a user error (bad config, missing data) fails its pair at once with its message.

The methods are a config choice (``pairs``, or ``tokenizer.method`` and ``generator.method``), not
different flows. Deployments (``infra/prefect.yaml``, ``c2f deploy``) run this flow by module path,
so workers use the installed package.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait
from prefect.states import Failed

from coarse2fine.evaluate import compare, tracking
from coarse2fine.pipelines import runs, stages
from coarse2fine.pipelines.config import Config, load_config
from coarse2fine.pipelines.runs import RunRef
from coarse2fine.preprocess import schema

RETRIES = 2
RETRY_DELAY_S = 10
SUMMARY = {"c2f_summary": True}
"""Marks the log records holding the end-of-run report (``extra=SUMMARY``): the Prefect UI shows
them, ``c2f run`` prints the report itself on stdout and leaves them out of its console."""


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
    from coarse2fine.preprocess.schema import url_to_fs

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


@_task("train")
def train_task(cfg: Config, kind: str, warm_start: bool, images_uri: str | None = None,
               tokenizer: RunRef | None = None, tokens: dict[str, Any] | None = None) -> RunRef:
    """Train (resume, reuse) the tokenizer on ``images_uri``, or the generator on the ``tokens``
    dataset of ``tokenizer``: what the earlier tasks of this flow run produced."""
    if kind == "tokenizer":
        res = stages.train_tokenizer(cfg, warm_start=warm_start, images_uri=images_uri)
    else:
        res = stages.train_generator(cfg, warm_start=warm_start, tokenizer_run=tokenizer.run_id,
                                     tokens_uri=tokens["uri"])
    get_run_logger().info("%s %s: %s run %s", kind, getattr(cfg, kind).method,
                          "reused finished" if res.reused else "trained", res.run_id)
    return res


@_task("tokenize")
def tokenize_task(cfg: Config, tokenizer: RunRef) -> dict[str, Any]:
    r = stages.tokenize(cfg, tokenizer.run_id)
    get_run_logger().info("tokens: %s %s", "reused" if r.reused else "built", r.uris["tokens"])
    return {"dataset": "tokens", "uri": r.uris["tokens"], "rows": r.rows["tokens"], "reused": r.reused}


_EVALUATING = threading.Lock()
"""One evaluation at a time on the flow's machine, whatever the pairs running at once: images/s
are measured alone (and two evaluations would share one GPU's memory)."""


@_task("evaluate")
def evaluate_task(cfg: Config, run: RunRef) -> dict[str, Any]:
    """Evaluate a tokenizer or generator run unless it was already evaluated with this protocol."""
    reused = stages.evaluation_done(cfg, run.run_id)
    if reused:
        get_run_logger().info("evaluate: reused the evaluation already logged in run %s", run.run_id)
    else:
        with _EVALUATING:
            stages.evaluate(cfg, run.run_id)
    kind = runs.run_kind(cfg.tracking, run.run_id)
    return stages.run_summary(cfg, run.run_id) | {"reused": reused, "trained": not run.reused,
                                                  "method": getattr(cfg, kind).method}


@_task("compare")
def compare_task(cfg: Config, generator_runs: dict[str, str]) -> dict[str, Any]:
    """The side-by-side table of the pairs that finished (``pair -> generator run``)."""
    res = compare.compare_methods(cfg.tracking, list(generator_runs.values()), schema.join(cfg.storage.root, "comparison"))
    get_run_logger().info("comparison: %s MLflow run %s\n%s", "reused" if res.reused else "logged", res.run_id,
                          res.markdown, extra=SUMMARY)
    return {"run_id": res.run_id, "markdown": res.markdown, "files": res.files, "reused": res.reused}


def pairs_at_once(pairs: list[tuple[str, Config]]) -> int:
    """How many pairs train at the same time: as many as the Ray cluster's resources hold the most
    demanding training of any pair, at least one. A training needs ``num_workers`` GPUs and CPUs
    (with ``use_gpu``; Ray reserves one CPU per worker), or ``num_workers × torch_threads`` CPUs
    (what CPU workers really use).

    On a 2-core machine the demo (one worker of 2 threads) runs one pair at a time, a one-thread
    config two. Evaluations run one at a time whatever the number (``_EVALUATING``); on a cluster
    they share the flow's machine with nothing but other pairs' tasks that only wait for Ray."""
    from coarse2fine.train.launch import ensure_ray

    free = ensure_ray(pairs[0][1].ray)

    def fits(t) -> float:
        cpus = free.get("CPU", 1) // (t.num_workers * (1 if t.use_gpu else t.torch_threads or 1))
        return min(cpus, free.get("GPU", 0) // t.num_workers) if t.use_gpu else cpus

    return max(1, int(min(fits(t) for _, c in pairs for t in (c.tokenizer.train, c.generator.train))))


@dataclass
class _Chain:
    """The futures of one pair, in the order they run: tokenizer training, its evaluation, tokens
    (these three shared by the pairs of one tokenizer), generator training, its evaluation; and the
    task run names (``train-tokenizer[sit]``, …) for messages."""

    tokenizer: PrefectFuture
    tokenizer_eval: PrefectFuture
    tokens: PrefectFuture
    names: tuple[str, ...]
    generator: PrefectFuture | None = None
    generator_eval: PrefectFuture | None = None

    def futures(self) -> list[PrefectFuture]:
        return [self.tokenizer, self.tokenizer_eval, self.tokens, self.generator, self.generator_eval]

    def error(self) -> str | None:
        """``task name: error`` of the first task of the chain that did not complete, or None."""
        for name, f in zip(self.names, self.futures()):
            if not f.state.is_completed():
                exc = f.state.result(raise_on_failure=False)
                return f"{name}: {exc if isinstance(exc, BaseException) else f.state.message}"
        return None


def _submit_pairs(pairs: list[tuple[str, Config]], images_uri: str, retrain: bool, at_once: int) -> dict[str, _Chain]:
    """Submit each pair's tasks, ``at_once`` pairs at a time (each pair's tasks run in order); a
    tokenizer shared by several pairs (same method, parameters and training) trains once."""
    tokenizers: dict[str, _Chain] = {}
    chains: dict[str, _Chain] = {}
    labels: set[str] = set()
    for i in range(0, len(pairs), at_once):
        wave = pairs[i: i + at_once]
        for name, pcfg in wave:
            key = json.dumps(stages.tokenizer_spec(pcfg), sort_keys=True, default=str)
            if key not in tokenizers:
                # the method names the tokenizer, or the pair when another pair's differs (overrides)
                label = pcfg.tokenizer.method if pcfg.tokenizer.method not in labels else f"{pcfg.tokenizer.method}@{name}"
                labels.add(label)
                names = tuple(f"{step}[{label}]" for step in ("train-tokenizer", "evaluate-tokenizer", "tokenize"))
                tok = train_task.with_options(task_run_name=names[0]).submit(pcfg, "tokenizer", retrain,
                                                                              images_uri=images_uri)
                tok_eval = evaluate_task.with_options(task_run_name=names[1]).submit(pcfg, tok)
                tokens = tokenize_task.with_options(task_run_name=names[2]).submit(pcfg, tok, wait_for=[tok_eval])
                tokenizers[key] = _Chain(tok, tok_eval, tokens, names)
            shared = tokenizers[key]
            names = shared.names + (f"train-generator[{name}]", f"evaluate-generator[{name}]")
            gen = train_task.with_options(task_run_name=names[3]).submit(
                pcfg, "generator", retrain, tokenizer=shared.tokenizer, tokens=shared.tokens)
            gen_eval = evaluate_task.with_options(task_run_name=names[4]).submit(pcfg, gen)
            chains[name] = replace(shared, names=names, generator=gen, generator_eval=gen_eval)
        wait([f for name, _ in wave for f in chains[name].futures()])
    return chains


@flow(name="full-pipeline")
def full_pipeline(config: list[str] | str = "configs/demo.yaml", overrides: list[str] | None = None,
                  demo_images: int = 0, retrain: bool = False) -> dict[str, Any]:
    """Run every stage for one config (YAML path(s), later files override earlier ones, then
    ``dotted.key=value`` overrides): preprocess once, then train, evaluate and tokenize every
    tokenizer:generator pair of ``pairs`` (or the one configured pair) as its own tasks, and end
    with the comparison table. ``demo_images > 0`` fills an empty ``data.source`` with demo
    photographs first. ``retrain`` (the nightly deployment): models whose data changed continue
    from the latest finished run of the same config instead of starting from scratch (ingest
    always reads only inputs it has not seen).

    A pair that fails fails only its own tasks: the others finish and are compared, and the flow
    run ends Failed naming the pair; a re-run reuses every finished dataset and run (by
    fingerprint) and continues only what is missing. Returns (and logs) datasets with row counts,
    MLflow runs with their key metrics and grids, each pair's outcome and the comparison."""
    cfg = load_config([str(Path(p)) for p in ([config] if isinstance(config, str) else config)], overrides or [])
    log = get_run_logger()
    if demo_images:
        demo_data_task(cfg, demo_images)
    datasets = preprocess_task(cfg)
    images_uri = next(d["uri"] for d in datasets if d["dataset"] == "images")
    pairs = cfg.pair_configs()
    tracking.configure(cfg.tracking)  # the experiment exists before pairs run at once (no creation race)
    at_once = pairs_at_once(pairs)
    log.info("pairs: %s (%d at a time, see pairs_at_once)", ", ".join(n for n, _ in pairs), at_once)
    chains = _submit_pairs(pairs, images_uri, retrain, at_once)
    errors = {name: c.error() for name, c in chains.items()}
    finished = [name for name, e in errors.items() if e is None]
    summary: dict[str, Any] = {"datasets": datasets, "runs": [], "pairs": [], "comparison": None,
                               "tracking_uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment}
    seen: set[str] = set()
    for name, chain in chains.items():
        for f in (chain.tokens, chain.tokenizer_eval, chain.generator_eval):
            if f.state.is_completed() and f.task_run_id not in seen:
                seen.add(f.task_run_id)
                (summary["datasets"] if f is chain.tokens else summary["runs"]).append(f.result())
        summary["pairs"].append({"pair": name, "status": "failed" if errors[name] else "finished",
                                 "error": errors[name],
                                 "generator_run": chain.generator.result().run_id if errors[name] is None else None})
    failed = [f"pair {name} failed at {e}" for name, e in errors.items() if e]
    if finished:
        state = compare_task(cfg, {p["pair"]: p["generator_run"] for p in summary["pairs"] if p["status"] == "finished"},
                             return_state=True)
        if state.is_completed():
            summary["comparison"] = state.result()
        else:  # e.g. runs of another protocol: the pairs' outcomes are still reported
            failed.append(f"compare failed: {state.result(raise_on_failure=False)}")
    log.info("summary\n%s", format_summary(summary), extra=SUMMARY)
    if failed:
        return Failed(message="; ".join(failed), data=summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The short report printed at the end of a run."""
    lines = ["datasets:"]
    for d in summary["datasets"]:
        lines.append(f"  {d['dataset']:<14} {d['rows']:>7} rows  {'reused' if d['reused'] else 'built '}  {d['uri']}")
    lines.append(f"MLflow runs ({summary['tracking_uri']}, experiment {summary['experiment']}):")
    for r in summary["runs"]:
        metrics = ", ".join(f"{k} {compare.BETTER[k]} {v:.4g}" + (f" (n={r['n'][k]})" if k in r["n"] else "")
                            for k, v in r["metrics"].items())
        lines.append(f"  {r['kind']:<10} {r.get('method', ''):<8} {r['run_id']}  "
                     f"{'trained' if r['trained'] else 'reused '}  {metrics}")
        for g in r["grids"]:
            lines.append(f"             grid: {g}")
    if len(summary["pairs"]) > 1 or any(p["error"] for p in summary["pairs"]):
        lines.append("pairs:")
        for p in summary["pairs"]:
            lines.append(f"  {p['pair']:<16} {p['status']}" + (f": {p['error']}" if p["error"] else ""))
    if summary["comparison"]:
        c = summary["comparison"]
        lines.append(f"comparison (MLflow run {c['run_id']}; {', '.join(c['files'])}):")
        lines.append(c["markdown"])
    lines.append(f"browse: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return "\n".join(lines)
