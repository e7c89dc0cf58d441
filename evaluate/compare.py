"""Compare runs of an experiment: a table and a PNG plot of chosen metrics (``c2f compare``), and
the side-by-side table of tokenizer:generator pairs (``c2f compare --methods``, the flow's last step).
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from coarse2fine.evaluate import tracking
from coarse2fine.evaluate.tracking import MACHINE_TAG, PERCEPTUAL_KIND_TAG, PROTOCOL_TAG, TRAIN_TIME_METRIC
from coarse2fine.evaluate.config import TrackingConfig
from coarse2fine.preprocess import schema, storage
from coarse2fine.preprocess.errors import UserKeyError, UserValueError

COMPARISON_TAG = "c2f.kind"
BETTER = {"psnr": "↑", "ssim": "↑", "rfid": "↓", "fid": "↓", "kid": "↓", "images_per_s": "↑", "codebook_usage": "↑"}
"""The direction that is better (Markdown headers, plot titles, the end-of-run summary)."""
COMPARISON_FP_TAG = "c2f.comparison_fingerprint"  # the runs and evaluations a comparison run compared


def runs_table(tracking_cfg: TrackingConfig, experiment: str, metrics: list[str]) -> pd.DataFrame:
    """One row per run (newest first): id, name, method, status and the requested metrics.

    Comparison runs themselves (tagged ``c2f.kind=comparison``) are left out.
    """
    tracking.set_store(tracking_cfg)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise UserKeyError(f"no MLflow experiment named {experiment!r} at {tracking_cfg.uri}")
    df = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"])
    if df.empty:
        return pd.DataFrame(columns=["run_id", "run_name", "method", "status", *metrics])
    tag = f"tags.{COMPARISON_TAG}"
    if tag in df:
        df = df[df[tag].fillna("") != "comparison"]
    out = pd.DataFrame({
        "run_id": df["run_id"],
        "run_name": df.get("tags.mlflow.runName", pd.Series([""] * len(df), index=df.index)),
        "method": df.get("tags.c2f.method", pd.Series([""] * len(df), index=df.index)),
        "status": df["status"],
    })
    for m in metrics:
        out[m] = df.get(f"metrics.{m}", pd.Series([float("nan")] * len(df), index=df.index))
    return out.reset_index(drop=True)


def plot(table: pd.DataFrame, metrics: list[str], out_png: str | Path) -> Path:
    """One bar chart per metric that some run has (better direction in the title), runs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if table[m].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.5), squeeze=False)
    labels = [f"{n or r[:8]}" for n, r in zip(table["run_name"], table["run_id"])]
    for ax, m in zip(axes[0], metrics):
        ax.bar(range(len(table)), table[m].astype(float), color="tab:blue")
        ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{m} {BETTER.get(m, '')}".strip())
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def compare(tracking_cfg: TrackingConfig, experiment: str, metrics: list[str], out_png: str | Path) -> tuple[pd.DataFrame, Path, str]:
    """Table + plot, also logged as artifacts of a new comparison run; returns its run id."""
    table = runs_table(tracking_cfg, experiment, metrics)
    png = plot(table, metrics, out_png)
    with tracking.run(tracking_cfg.model_copy(update={"experiment": experiment}), run_name="compare",
                      tags={COMPARISON_TAG: "comparison"}) as active:
        tracking.log_table(table.to_dict("records"), "comparison/runs.json")
        mlflow.log_artifact(str(png), "comparison")
    return table, png, active.info.run_id


# (column, source run, MLflow metric) of the method table; the pair, token kind and machine are added.
METHOD_COLUMNS = [
    ("tokens_per_image", "tokenizer", "tokens_per_image"),  # latent floats for continuous tokenizers
    ("bits_per_image", "tokenizer", "bits_per_image"),
    ("codebook_usage", "tokenizer", "codebook_usage"),
    ("unique_ratio", "tokenizer", "unique_ratio"),
    ("psnr", "tokenizer", "psnr"),
    ("ssim", "tokenizer", "ssim"),
    ("rfid", "tokenizer", "rfid"),
    ("rfid_n", "tokenizer", "rfid_n"),
    ("fid", "generator", "fid"),
    ("kid", "generator", "kid"),
    ("fid_n", "generator", "fid_n"),
    ("cfg", "generator", "cfg_scale"),
    ("images_per_s", "generator", "images_per_s"),
    ("eval_batch", "generator", "eval_batch_size"),
    ("transformer_passes", "generator", "forward_passes"),
    ("diffusion_passes", "generator", "diffusion_passes"),
    ("tokenizer_mparams", "tokenizer", "num_params"),
    ("generator_mparams", "generator", "num_params"),
    ("tokenizer_train_min", "tokenizer", TRAIN_TIME_METRIC),
    ("generator_train_min", "generator", TRAIN_TIME_METRIC),
]
SCALE = {"tokenizer_mparams": 1e-6, "generator_mparams": 1e-6, "tokenizer_train_min": 1 / 60,
         "generator_train_min": 1 / 60}


@dataclass
class MethodComparison:
    table: pd.DataFrame
    markdown: str
    files: list[str]  # the Markdown, CSV and plots, where they were written
    run_id: str  # the ``comparison`` MLflow run holding them
    reused: bool  # the same runs with the same evaluations were compared before: that run is returned


def method_table(tracking_cfg: TrackingConfig, generator_runs: list[str]) -> pd.DataFrame:
    """One row per generator run and its tokenizer run. Refuses (one line) runs that do not share
    the images fingerprint or the evaluation protocols, or that are not evaluated."""
    tracking.set_store(tracking_cfg)
    client = mlflow.MlflowClient()
    rows, keys = [], {}
    for gen_id in generator_runs:
        gen = client.get_run(gen_id)
        tok = client.get_run(gen.data.tags["c2f.tokenizer_run"])
        pair = f"{tok.data.tags['c2f.method']}:{gen.data.tags['c2f.method']}"
        for kind, run in (("tokenizer", tok), ("generator", gen)):
            if PROTOCOL_TAG not in run.data.tags:
                raise UserValueError(f"{kind} run {run.info.run_id} of {pair} is not evaluated with a recorded "
                                     f"protocol ({PROTOCOL_TAG}): c2f evaluate --run {run.info.run_id}")
        keys[pair] = (tok.data.tags["c2f.images_fingerprint"], tok.data.tags[PROTOCOL_TAG], gen.data.tags[PROTOCOL_TAG])
        row = {"pair": pair, "tokens": "discrete" if "bits_per_image" in tok.data.metrics else "continuous",
               # the tokenizer's perceptual loss, beside every FID: the Inception-stem one reads FID's network
               "perceptual": tok.data.tags.get(PERCEPTUAL_KIND_TAG, "unrecorded")}
        for column, source, metric in METHOD_COLUMNS:
            value = (tok if source == "tokenizer" else gen).data.metrics.get(metric, float("nan"))
            row[column] = value * SCALE.get(column, 1)
        rows.append(row | {"machine": gen.data.tags.get(MACHINE_TAG, ""), "tokenizer_run": tok.info.run_id,
                           "generator_run": gen_id})
    for what, i in (("images", 0), ("tokenizer evaluation protocol", 1), ("generator evaluation protocol", 2)):
        seen = {k[i] for k in keys.values()}
        if len(seen) > 1:
            raise UserValueError(f"refusing to compare runs of different {what}s: " + ", ".join(
                f"{p} {k[i]}" for p, k in keys.items()) + " (evaluate them with one config, or compare fewer pairs)")
    return pd.DataFrame(rows)


def latest_method_runs(tracking_cfg: TrackingConfig, experiment: str) -> list[str]:
    """The newest evaluated generator run of each tokenizer:generator pair in ``experiment``, among
    the runs on the images and under the evaluation protocol of the newest one (``c2f compare --methods``)."""
    tracking.set_store(tracking_cfg)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise UserKeyError(f"no MLflow experiment named {experiment!r} at {tracking_cfg.uri}")
    found = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                               filter_string=f"tags.`c2f.kind` = 'generator' and tags.`{PROTOCOL_TAG}` != ''",
                               order_by=["attributes.start_time DESC"])
    if not found:
        raise UserKeyError(f"experiment {experiment!r} has no generator run evaluated with a recorded protocol "
                           f"({PROTOCOL_TAG}): run c2f run, or c2f evaluate --run ID on older runs")
    newest: dict[str, str] = {}
    images, protocol = found[0].data.tags["c2f.images"], found[0].data.tags[PROTOCOL_TAG]
    for run in found:
        pair = f"{run.data.tags['c2f.tokenizer_method']}:{run.data.tags['c2f.method']}"
        if (run.data.tags["c2f.images"], run.data.tags[PROTOCOL_TAG]) == (images, protocol) and pair not in newest:
            newest[pair] = run.info.run_id
    return list(newest.values())


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (floats with 4 significant digits, NaN as '–', better direction
    marked in the header)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if v != v else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(f"{c} {BETTER[c]}" if c in BETTER else c for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _footnote(table: pd.DataFrame) -> str:
    """What the Markdown leaves out of its columns: machine, protocol, units."""
    return (f"images/s: sampling + decoding at batch eval_batch on {' / '.join(sorted(set(table['machine'])))}; "
            "FID/KID: fid_n generated images vs the real images dataset, rFID: rfid_n held-out images "
            "(Inception TF-2015 pool3); tokens_per_image counts latent floats for continuous tokens; "
            "mparams in millions; train_min: wall minutes of training (over the invocations that ended). "
            "Run ids: methods.csv.")


def method_plots(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Generation FID vs images/s, and reconstruction PSNR vs tokens (latent floats) per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(table["fid_n"].max()) if table["fid_n"].notna().any() else 0
    out = []
    for x, y, name, xlabel, ylabel in (
            ("images_per_s", "fid", "fid_vs_speed.png", "generated images/s (batch, machine: see table)",
             f"generation FID (n={n}) ↓"),
            ("tokens_per_image", "psnr", "psnr_vs_tokens.png", "tokens (or latent floats) per image",
             "reconstruction PSNR (dB) ↑")):
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for kind, marker in (("discrete", "o"), ("continuous", "s")):
            part = table[table["tokens"] == kind]
            ax.scatter(part[x], part[y], marker=marker, label=f"{kind} tokens")
        for _, row in table.iterrows():
            ax.annotate(row["pair"], (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.15)  # room for the pair labels
        ax.set_xlabel(xlabel + (" →" if x == "images_per_s" else ""))
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        out.append(out_dir / name)
    return out


def compare_methods(tracking_cfg: TrackingConfig, generator_runs: list[str], out_root: str) -> MethodComparison:
    """The method table of ``generator_runs`` as Markdown, CSV and two plots, written under
    ``out_root/{fingerprint}/`` and logged to a new ``comparison`` MLflow run — or that run, reused,
    when the same runs with the same evaluations (the fingerprint) were compared before."""
    import sys

    table = method_table(tracking_cfg, generator_runs)
    markdown = to_markdown(table.drop(columns=["machine", "tokenizer_run", "generator_run"])) + "\n\n" + _footnote(table)
    # what is compared, cell by cell (a re-evaluation under the same protocol changes it)
    fp = storage.fingerprint("comparison", {}, [table.to_csv(index=False)], storage.code_version(sys.modules[__name__]))
    uri = schema.join(out_root, fp)
    files = [schema.join(uri, name) for name in ("methods.md", "methods.csv", "fid_vs_speed.png", "psnr_vs_tokens.png")]
    tracking.configure(tracking_cfg)
    done = mlflow.search_runs(experiment_names=[tracking_cfg.experiment], output_format="list", max_results=1,
                              filter_string=f"tags.`{COMPARISON_FP_TAG}` = '{fp}'")
    if done and all(schema.url_to_fs(f)[0].exists(schema.url_to_fs(f)[1]) for f in files):
        return MethodComparison(table, markdown, files, done[0].info.run_id, True)
    fs, path = schema.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        (local / "methods.md").write_text(markdown + "\n")
        table.to_csv(local / "methods.csv", index=False)
        local_files = [local / "methods.md", local / "methods.csv", *method_plots(table, local)]
        assert [f.name for f in local_files] == [posixpath.basename(f) for f in files]
        with tracking.run(tracking_cfg, run_name="compare-methods",
                          tags={COMPARISON_TAG: "comparison", COMPARISON_FP_TAG: fp}) as active:
            mlflow.log_param("pairs", ", ".join(table["pair"]))
            for f in local_files:
                mlflow.log_artifact(str(f), "comparison")
        for f in local_files:
            fs.put_file(str(f), f"{path}/{f.name}")
    return MethodComparison(table, markdown, files, active.info.run_id, False)
