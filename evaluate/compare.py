"""Compare runs of an experiment: a table and a PNG plot of chosen metrics (``c2f compare``)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from coarse2fine.evaluate import tracking
from coarse2fine.evaluate.config import TrackingConfig
from coarse2fine.preprocess.errors import UserKeyError

COMPARISON_TAG = "c2f.kind"


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
    """One bar chart per metric, runs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.5), squeeze=False)
    labels = [f"{n or r[:8]}" for n, r in zip(table["run_name"], table["run_id"])]
    for ax, m in zip(axes[0], metrics):
        ax.bar(range(len(table)), table[m].astype(float), color="tab:blue")
        ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(m)
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
