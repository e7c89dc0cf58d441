"""``c2f``: the command-line entry point.

Every subcommand that runs a stage takes ``--config FILE`` and repeatable ``--set key=value``;
user errors (bad config, missing path, incomplete dataset) end with a one-line reason and exit
code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from coarse2fine.pipelines.config import Config, load_config, load_section
from coarse2fine.preprocess.errors import UserError

app = typer.Typer(
    help="coarse2fine: coarse-to-fine image tokenizers and generators. `c2f run` runs the whole Prefect flow "
    "(Beam preprocessing → Ray Train tokenizer → tokens → generator → evaluation, tracked in MLflow); the other "
    "commands run one stage, sample, inspect datasets, compare runs or create Prefect deployments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
# Usage errors from click itself and from the click that newer typer releases bundle (typer._click).
USAGE_ERRORS = (click.ClickException, typer.TyperException)
EXITS = (click.exceptions.Exit, typer.Exit)
ABORTS = (click.exceptions.Abort, typer.Abort)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"coarse2fine {version('coarse2fine')}")
        raise typer.Exit()


OUT_DIR = Path(".c2f/out")
"""Where PNG outputs go without --out / --png: under the working folder's .c2f/ (git-ignored)."""
NOISY_LOGGERS = ("apache_beam", "absl")  # Beam's job service and workers, and its gRPC dependency


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Beam's log lines, its worker "
                                       "processes' included (quiet below errors by default).")) -> None:
    """coarse2fine's command line."""
    if verbose:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.INFO)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/demo.yaml); repeat to "
                         "layer an overlay such as infra/beam/dataflow.yaml on top. Commands that take --run default "
                         "to the config that run was trained with (found via tracking.uri).")
SetOpt = typer.Option(None, "--set", help="Override a config value: dotted.key=value (repeatable).")


def _output(path: Path) -> str:
    """An output file's path, its folder created (the default ``OUT_DIR`` may not exist yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _config(config: Optional[List[Path]], overrides: Optional[List[str]]) -> Config:
    return load_config(config, overrides or [])


def _run_config(config: Optional[List[Path]], overrides: Optional[List[str]], run_id: str) -> Config:
    """``--config`` when given; else the config the run ``run_id`` was trained with, found in the
    MLflow store of ``tracking.*`` (default, or ``--set tracking.uri=…``), with ``--set`` on top."""
    if config:
        return _config(config, overrides)
    from coarse2fine.pipelines import runs
    from coarse2fine.pipelines.config import config_from_tree

    tracking_cfg = load_section(None, overrides, "tracking")
    tree = runs.run_config(tracking_cfg, run_id)
    tree["tracking"] = tree.get("tracking", {}) | {"uri": tracking_cfg.uri}  # where the run was found
    console.print(f"config: the one run {run_id} was trained with ({tracking_cfg.uri})", soft_wrap=True)
    return config_from_tree(tree, overrides or [])


def _print_table(title: str, columns: list[str], rows, float_fmt: str) -> None:
    """A rich table on stdout; floats formatted with ``float_fmt``."""
    t = Table(title=title)
    for col in columns:
        t.add_column(str(col))
    for row in rows:
        t.add_row(*[float_fmt.format(v) if isinstance(v, float) else str(v) for v in row])
    out.print(t)


@app.command("demo-data")
def demo_data(
    out_dir: str = typer.Option(..., "--out", help="Folder (any fsspec URI) to write PNG files into (one sub-folder per photo)."),
    n: int = typer.Option(200, "--n", min=1, help="Number of crops."),
    resolution: int = typer.Option(64, "--resolution", min=8, help="Side of the square crops in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
) -> None:
    """Write N seeded random crops of the photographs bundled in scikit-image / scikit-learn."""
    from coarse2fine.preprocess.demo_data import write_demo_folder

    write_demo_folder(out_dir, n, resolution, seed)
    out.print(f"wrote {n} PNG files to {out_dir}")


def _run_preprocess(cfg: Config) -> list:
    from coarse2fine.pipelines import stages

    results = stages.preprocess(cfg)
    table = Table(title="preprocess")
    for col in ("stage", "dataset", "rows", "status"):
        table.add_column(col)
    table.add_column("uri", overflow="fold")
    for r in results:
        for name, uri in r.uris.items():
            status = "reused" if r.reused else f"built in {r.seconds:.1f}s"
            table.add_row(r.stage, name, str(r.rows[name]), status, uri)
    out.print(table)
    ingest = results[0].counts
    if ingest:
        out.print("ingest counts: " + ", ".join(f"{k}={v}" for k, v in ingest.items()))
    return results


@app.command()
def preprocess(config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Run ingest → spectral → decomposition as Beam jobs and print the datasets written."""
    _run_preprocess(_config(config, set_))


@app.command()
def run(
    config: Optional[List[Path]] = typer.Option(None, "--config", "-c", help="YAML config (default configs/demo.yaml); "
                                                "repeat to layer overlays."),
    set_: Optional[List[str]] = SetOpt,
    demo_images: int = typer.Option(0, "--demo-images", min=0,
                                    help="Fill an empty data.source with this many demo photographs first."),
    retrain: bool = typer.Option(False, "--retrain", help="Models whose data changed continue from their latest "
                                 "finished run (what the nightly-retrain deployment does)."),
) -> None:
    """Run the whole pipeline, the Prefect flow `full-pipeline`: preprocess once, then for every
    tokenizer:generator pair of the config's `pairs` (or the one configured pair) train tokenizer →
    evaluate → tokenize → train generator → evaluate, and end with the method table. Finished
    stages are reused, interrupted training resumes, a failing pair fails alone (exit 2 naming it,
    after the others finished). Uses a temporary local Prefect API unless PREFECT_API_URL names a server."""
    from coarse2fine.pipelines.flows import format_summary, full_pipeline

    paths = [str(p) for p in (config or [Path("configs/demo.yaml")])]
    cfg = _config([Path(p) for p in paths], set_)  # fail fast, with one line, before Prefect starts
    cfg.pair_configs()
    keys = {o.split("=", 1)[0].strip() for o in set_ or []}
    if cfg.pairs and keys & {"tokenizer.method", "generator.method"} and "pairs" not in keys:
        raise UserError(f"the config lists pairs ({', '.join(p.pair for p in cfg.pairs)}), which the flow runs instead "
                        f"of tokenizer.method / generator.method; for one pair: --set 'pairs=[TOKENIZER:GENERATOR]'")
    t0 = time.time()
    state = full_pipeline(config=paths, overrides=set_ or [], demo_images=demo_images, retrain=retrain,
                          return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict):  # completed, or failed pairs beside finished ones
        out.print(format_summary(summary), soft_wrap=True)
    if not state.is_completed():
        raise UserError(f"flow run {state.name}: {state.message}")
    out.print(f"[bold]done in {time.time() - t0:.0f}s[/bold]")
    out.print("inspect a dataset: c2f inspect URI [--key KEY --png row.png], or duckdb/polars on URI/*.parquet", soft_wrap=True)
    out.print(f"compare pairs: c2f compare --methods --experiment {cfg.tracking.experiment}   "
              f"(any metric: c2f compare -e {cfg.tracking.experiment} -m psnr -m fid)", soft_wrap=True)


@app.command()
def deploy(
    prefect_file: Optional[Path] = typer.Option(None, "--prefect-file", dir_okay=False,
                                                help="Deployments to create (default: infra/prefect.yaml in --workdir)."),
    pool: str = typer.Option("c2f-process", "--pool", help="Process work pool (created if missing)."),
    workdir: Path = typer.Option(Path("."), "--workdir", file_okay=False,
                                 help="Folder the deployment's runs start in (relative config paths resolve there): "
                                      "a checkout of coarse2fine, or any folder holding its configs/ (and infra/)."),
    name: Optional[List[str]] = typer.Option(None, "--name", help="Deploy only this deployment (repeatable)."),
) -> None:
    """Create the work pool and the deployments (full-pipeline/demo, full-pipeline/compare, full-pipeline/nightly-retrain)
    on the Prefect server named by PREFECT_API_URL; then start a worker with
    `prefect worker start --pool c2f-process` and run `prefect deployment run full-pipeline/demo`."""
    import os
    import subprocess

    if not os.environ.get("PREFECT_API_URL"):
        raise UserError("PREFECT_API_URL is not set: start a server (prefect server start) and export "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api")
    workdir = workdir.resolve()
    prefect_file = (prefect_file or workdir / "infra/prefect.yaml").resolve()
    if not prefect_file.is_file():
        raise UserError(f"{prefect_file} does not exist: pass --prefect-file, or a --workdir holding infra/prefect.yaml")
    if not (workdir / "configs/demo.yaml").is_file():
        raise UserError(f"--workdir {workdir} has no configs/demo.yaml, which the deployments' runs read there: "
                        "pass the folder of a coarse2fine checkout")
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = os.environ | {"C2F_WORKDIR": str(workdir)}
    subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    targets = [a for n in name for a in ("--name", n)] if name else ["--all"]
    subprocess.run([prefect, "--no-prompt", "deploy", *targets, "--pool", pool, "--prefect-file", str(prefect_file)],
                   check=True, env=env, cwd=workdir)
    out.print(f"work pool {pool} and deployments ready; runs start in {workdir}")


@app.command()
def inspect(
    uri: str = typer.Argument(..., help="Dataset URI or path (a folder holding _manifest.json)."),
    key: Optional[str] = typer.Option(None, "--key", help="Row key (or a unique prefix) to render."),
    png: Optional[str] = typer.Option(None, "--png", help="Write the rendered row to this PNG."),
    head: int = typer.Option(3, "--head", min=0, help="Print the first rows' keys."),
) -> None:
    """Print a dataset's schema, row count and manifest; render one row as a picture with --png
    (a tokens row: its image, id maps or latents, and its decoding by the tokenizer checkpoint)."""
    from coarse2fine.pipelines import apps
    from coarse2fine.preprocess import inspection, schema

    info = inspection.describe(uri)
    m = info["manifest"]
    out.print(f"[bold]{uri}[/bold]\nrows: {info['rows']}   stage: {m['stage']}   fingerprint: {m['fingerprint']}")
    out.print(f"schema:\n{info['schema']}")
    out.print("manifest:")
    out.print_json(json.dumps({k: v for k, v in m.items() if k != "shards"} | {"shards": len(m["shards"])}, default=str))
    if head:
        keys = schema.read_shard(schema.shard_uris(uri)[0], ["key"] if "key" in info["schema"].names else None)
        if "key" in keys.column_names:
            out.print("first keys: " + ", ".join(k[:16] for k in keys.column("key").to_pylist()[:head]))
    if png and not key:
        raise UserError("--png needs --key")
    if key and png:
        extra = [apps.decoded_tokens_row(uri, key)] if m["stage"] == "tokens" else []
        inspection.render_row(uri, key, png, extra)
        out.print(f"wrote {png}")


@app.command()
def fid(
    path_a: str = typer.Argument(..., help="Reference set: image folder (any fsspec URI) or an images dataset."),
    path_b: str = typer.Argument(..., help="Set to score: image folder or an images dataset."),
    config: Optional[List[Path]] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    split: Optional[str] = typer.Option(None, "--split", help="Use only this split of a dataset (train/validation)."),
) -> None:
    """FID and KID between two image sets (TF-2015 Inception weights, offline), with the protocol."""
    from coarse2fine.evaluate.fid import Evaluator
    from coarse2fine.evaluate.image_sets import iter_batches

    cfg = load_section(config, set_, "evaluate")
    ev = Evaluator(cfg)
    res = ev.compare_features(ev.reference_features(path_a, split), ev.features(path_b, split, "images"))
    res = ev.inception_score(iter_batches(path_b, cfg.batch_size, cfg.max_samples, split), res)
    out.print(f"FID {res.fid:.4f}   KID {res.kid_mean:.6f} ± {res.kid_std:.6f}   (n={res.n_real} vs {res.n_fake})")
    out.print(f"IS {res.inception_score:.3f} ± {res.inception_score_std:.3f}" if res.inception_score is not None
              else res.is_skipped_reason)
    out.print("protocol: " + ", ".join(f"{k}={v}" for k, v in res.protocol.items()))


@app.command()
def compare(
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="MLflow experiment name "
                                             "(default: the config's tracking.experiment)."),
    methods: bool = typer.Option(False, "--methods", help="The side-by-side table of tokenizer:generator pairs: "
                                 "the newest evaluated generator run of each pair on the newest images, with its "
                                 "tokenizer run (refuses runs of different images or evaluation protocols)."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Metric to compare (repeatable); default fid, psnr."),
    config: Optional[List[Path]] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    png: Path = typer.Option(OUT_DIR / "comparison.png", "--png", help="Where to write the comparison plot (not with --methods)."),
) -> None:
    """Table and plot of an experiment's runs, or with --methods the method table (Markdown, CSV and
    two plots under storage.root/comparison/); both are logged to MLflow as a comparison run."""
    from coarse2fine.evaluate import compare as cmp
    from coarse2fine.preprocess import schema

    tracking_cfg = load_section(config, set_, "tracking")
    experiment = experiment or tracking_cfg.experiment
    if methods:
        runs = cmp.latest_method_runs(tracking_cfg, experiment)
        res = cmp.compare_methods(tracking_cfg.model_copy(update={"experiment": experiment}), runs,
                                  schema.join(load_section(config, set_, "storage").root, "comparison"))
        out.print(res.markdown, soft_wrap=True)
        out.print(f"files: {', '.join(res.files)}   logged as MLflow run {res.run_id}", soft_wrap=True)
        return
    metrics = metric or ["fid", "psnr"]
    table, png_path, run_id = cmp.compare(tracking_cfg, experiment, metrics, _output(png))
    _print_table(f"experiment {experiment}", list(table.columns), table.itertuples(index=False), "{:.4f}")
    out.print(f"plot: {png_path}   logged as MLflow run {run_id}")


@app.command("methods")
def list_methods() -> None:
    """List the registered tokenizer and generator methods, their config sections and capabilities."""
    from coarse2fine.train import methods

    rows = [("tokenizer", name, m.summary, f"tokenizer.{name}", "") for name, m in methods.TOKENIZERS.items()]
    rows += [("generator", name, m.summary, f"generator.{name}", ", ".join(sorted(m.capabilities)) or "-")
             for name, m in methods.GENERATORS.items()]
    _print_table("methods (select with tokenizer.method / generator.method)",
                 ["kind", "method", "what", "config section", "capabilities"], rows, "{}")


@app.command("train-tokenizer")
def train_tokenizer(
    config: Optional[List[Path]] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1,
                                             help="Stop (with a checkpoint) after this many total steps; re-run to resume."),
) -> None:
    """Train the configured tokenizer (tokenizer.method, see `c2f methods`) under Ray Train; resumes if interrupted."""
    from coarse2fine.pipelines import stages

    res = stages.train_tokenizer(_config(config, set_), stop_after)
    out.print(f"tokenizer run {res.run_id} ({'reused' if res.reused else 'trained'}); checkpoint {res.checkpoint}")


@app.command()
def tokenize(
    run: str = typer.Option(..., "--run", help="MLflow run id of a finished tokenizer."),
    config: Optional[List[Path]] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Beam job: encode every image into the tokenizer method's token columns, the tokens/{fingerprint}
    dataset (its manifest records the layout)."""
    from coarse2fine.pipelines import stages

    res = stages.tokenize(_run_config(config, set_, run), run)
    out.print(f"tokens: {res.rows['tokens']} rows {'(reused) ' if res.reused else ''}-> {res.uris['tokens']}")


@app.command()
def evaluate(
    run: str = typer.Option(..., "--run", help="MLflow run id of a finished tokenizer or generator run."),
    config: Optional[List[Path]] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Evaluate a trained model into its MLflow run. Tokenizer: per resolution PSNR/SSIM/L1/rFID,
    throughput, codebook usage. Generator: FID/KID and images/s per sampling setting — AR-SIT per stop
    scale with memory per image and upsampling PSNR/FID (SIT Tables 2 and 4 in miniature), MaskGIT per
    number of decoding steps (CQ Table 7 in miniature)."""
    from coarse2fine.pipelines import stages

    report = stages.evaluate(_run_config(config, set_, run), run)
    tables = report if isinstance(report, dict) else {"reconstruction": report}
    for name, rows in tables.items():
        if rows:
            _print_table(f"{name}, run {run}", list(rows[0]), (r.values() for r in rows), "{:.4g}")


@app.command("train-generator")
def train_generator(
    config: Optional[List[Path]] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1,
                                             help="Stop (with a checkpoint) after this many total steps; re-run to resume."),
) -> None:
    """Train the configured generator (generator.method, see `c2f methods`) on the configured
    tokenizer's token shards under Ray Train; trains/tokenizes the tokenizer first if needed, resumes
    if interrupted, reuses a finished run."""
    from coarse2fine.pipelines import stages

    res = stages.train_generator(_config(config, set_), stop_after)
    out.print(f"generator run {res.run_id} ({'reused' if res.reused else 'trained'}); checkpoint {res.checkpoint}")


RunOpt = typer.Option(..., "--run", help="MLflow run id of a finished generator run.")
ClassOpt = typer.Option(None, "--class", help="Class name or index (default: unconditional, the null class).")
SeedOpt = typer.Option(0, "--seed", help="Random seed (same seed, same samples).")
CfgScaleOpt = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance scale (default generator.guidance; 1 = off).")
TempOpt = typer.Option(None, "--temperature", min=1e-6, help="Sampling temperature (default generator.temperature).")
TopKOpt = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
TopPOpt = typer.Option(None, "--top-p", min=1e-6, max=1.0, help="Nucleus sampling mass (1 = off).")


def _settings(cfg_scale, temperature, top_k, top_p, steps=None) -> dict:
    return {"guidance": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p, "steps": steps}


@app.command()
def generate(
    run: str = RunOpt,
    n: int = typer.Option(16, "--n", min=1, help="Images to sample."),
    label: Optional[str] = ClassOpt,
    stop_scale: Optional[int] = typer.Option(None, "--stop-scale", min=1,
                                             help="Stop after this scale: a coarse image at its resolution (fast previews)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Parallel decoding steps of a masked generator "
                                        "(maskgit; default generator.steps, else 10)."),
    out_png: Path = typer.Option(OUT_DIR / "grid.png", "--out", help="PNG grid to write (token ids go to OUT.tokens.npz)."),
    seed: int = SeedOpt, cfg_scale: Optional[float] = CfgScaleOpt, temperature: Optional[float] = TempOpt,
    top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt,
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Sample images with the run's generator method: AR-SIT coarse to fine (KV-cached; with
    --stop-scale, a quick coarse preview whose token ids `c2f refine` continues); MaskGIT by parallel
    decoding in --steps steps."""
    from coarse2fine.pipelines import apps

    res = apps.generate(_run_config(config, set_, run), run, n, label, stop_scale, seed, _output(out_png),
                        **_settings(cfg_scale, temperature, top_k, top_p, steps))
    out.print(f"wrote {res['grid']} ({n} images, {res['resolution']}px, {res['num_tokens']} tokens each) "
              f"and {res['tokens']}; logged to run {run}")


@app.command()
def refine(
    run: str = RunOpt,
    tokens: Path = typer.Option(..., "--tokens", exists=True, dir_okay=False, help="OUT.tokens.npz written by `c2f generate`."),
    select: Optional[List[int]] = typer.Option(None, "--select", min=0, help="Row of the saved grid to refine (repeatable; default all)."),
    stop_scale: Optional[int] = typer.Option(None, "--stop-scale", min=1, help="Continue up to this scale (default: the last)."),
    out_png: Path = typer.Option(OUT_DIR / "refined.png", "--out", help="PNG grid to write."),
    seed: int = SeedOpt, cfg_scale: Optional[float] = CfgScaleOpt, temperature: Optional[float] = TempOpt,
    top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt,
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Continue chosen coarse previews to finer scales (their tokens are kept unchanged)."""
    from coarse2fine.pipelines import apps

    res = apps.refine(_run_config(config, set_, run), run, str(tokens), select, stop_scale, seed, _output(out_png),
                        **_settings(cfg_scale, temperature, top_k, top_p))
    out.print(f"wrote {res['grid']} ({res['resolution']}px) and {res['tokens']}")


@app.command()
def upsample(
    run: str = RunOpt,
    image: List[Path] = typer.Option(..., "--image", exists=True, dir_okay=False,
                                     help="Low-resolution square image, side = model resolution / 2^k (repeatable)."),
    label: Optional[str] = ClassOpt,
    out_png: Path = typer.Option(OUT_DIR / "upsampled.png", "--out", help="PNG grid: inputs (nearest) above outputs."),
    seed: int = SeedOpt, cfg_scale: Optional[float] = CfgScaleOpt, temperature: Optional[float] = TempOpt,
    top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt,
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Upsample: encode the low-resolution image into the first scales (scale-causal encoder), generate the rest."""
    from coarse2fine.pipelines import apps

    res = apps.upsample(_run_config(config, set_, run), run, [str(p) for p in image], label, seed, _output(out_png),
                          **_settings(cfg_scale, temperature, top_k, top_p))
    out.print(f"wrote {res['grid']} ({res['input_resolution']}px → {res['resolution']}px)")


@app.command()
def edit(
    run: str = RunOpt,
    image: List[Path] = typer.Option(..., "--image", exists=True, dir_okay=False, help="Image to edit (repeatable)."),
    keep_scales: int = typer.Option(1, "--keep-scales", min=1, help="Coarse scales of the image to keep."),
    label: Optional[str] = ClassOpt,
    out_png: Path = typer.Option(OUT_DIR / "edited.png", "--out", help="PNG grid: input, kept scales, edit."),
    seed: int = SeedOpt, cfg_scale: Optional[float] = CfgScaleOpt, temperature: Optional[float] = TempOpt,
    top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt,
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Edit: keep the coarse scales of an image and regenerate the finer ones under a new class."""
    from coarse2fine.pipelines import apps

    res = apps.edit(_run_config(config, set_, run), run, [str(p) for p in image], keep_scales, label, seed, _output(out_png),
                      **_settings(cfg_scale, temperature, top_k, top_p))
    out.print(f"wrote {res['grid']} (kept {res['keep_scales']} scale(s))")


class RunNameFormatter(logging.Formatter):
    """Prefixes a Prefect record with its task (or flow) run's name: ``train-tokenizer[sit]: …``."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f"{name}: " if name else ""
        return super().format(record)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app and turn user errors (:class:`UserError`, a missing
    file) into one line + exit 2; any other exception is a bug and keeps its traceback."""
    import os

    # Prefect's ephemeral server phones home for telemetry; offline that is an ERROR line per run.
    # Off unless the user asks for it (set PREFECT_SERVER_ANALYTICS_ENABLED=true).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a terminal gets Rich's columns; a log file or pipe plain unwrapped lines, and progress bars
    # that redraw every 30 s instead of every 0.1 s (each redraw is a carriage return, not a line)
    tty = console.is_terminal
    handler = RichHandler(console=console, show_path=False) if tty else logging.StreamHandler(sys.stderr)
    handler.setFormatter(RunNameFormatter("%(run)s%(message)s" if tty else "%(asctime)s %(levelname)-7s %(run)s%(message)s"))
    if not tty:
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    # Beam's GCP io module warns about optional BigQuery clients on import (root logger)
    handler.addFilter(lambda record: not record.getMessage().startswith("apitools not found"))
    handler.addFilter(lambda record: not getattr(record, "c2f_summary", False))  # `c2f run` prints it once
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for noisy in NOISY_LOGGERS:  # `--verbose` (`_root`) lowers them to INFO
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # every Prefect API call at INFO
    try:
        app(args=argv, standalone_mode=False)
    except EXITS as e:
        return e.exit_code
    except USAGE_ERRORS as e:
        e.show()
        return 2
    except ABORTS:
        console.print("aborted")
        return 130
    except (UserError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)  # one line, however long
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
