"""MLflow tracking: runs, flattened params, metrics, image grids, tables and figures.

The default store is ``sqlite:///…`` (MLflow 3 refuses a plain ``./mlruns`` file store); point
``tracking.uri`` at an ``http(s)://`` server to share runs.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np

from coarse2fine.evaluate.config import TrackingConfig

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
PROTOCOL_TAG = "c2f.eval_protocol"  # the evaluation protocol without the code: runs compared side by side share it
MACHINE_TAG = "c2f.eval_machine"  # where the evaluation's images/s were measured
PERCEPTUAL_KIND_TAG = "c2f.perceptual_kind"  # lpips | inception | ms_ssim | off: the tokenizer's perceptual loss
TRAIN_TIME_METRIC = "train_wall_s"  # seconds of training, added up over the invocations that ended (not a killed one)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}`` (lists and None as their repr)."""
    flat: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat |= flatten(v, f"{key}.")
        else:
            flat[key] = str(v)[:MAX_PARAM_LEN]
    return flat


def set_store(tracking: TrackingConfig) -> None:
    """Point MLflow at the configured store (creating the folder of a sqlite file)."""
    if tracking.uri.startswith("sqlite:///"):
        Path(tracking.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking.uri)


def configure(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured store and experiment (created if new); returns its id.

    With a sqlite store a new experiment keeps its artifacts in ``mlartifacts/`` beside the
    database file (MLflow's default, ``./mlruns``, depends on the working directory)."""
    set_store(tracking)
    if tracking.uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(tracking.experiment) is None:
        artifacts = Path(tracking.uri[len("sqlite:///"):]).parent / "mlartifacts"
        mlflow.create_experiment(tracking.experiment, artifact_location=artifacts.as_uri())
    return mlflow.set_experiment(tracking.experiment).experiment_id


@contextlib.contextmanager
def run(tracking: TrackingConfig, run_name: str | None = None, run_id: str | None = None,
        tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or re-open with ``run_id``) an MLflow run in the configured experiment."""
    configure(tracking)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags) as active:
        yield active


def log_config(config: dict) -> None:
    """Log the whole resolved config as flattened params."""
    mlflow.log_params(flatten(config))


def image_grid(images_NCHW: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images in [0, 1] (N, 3, H, W) into one uint8 (H', W', 3) grid."""
    n, c, h, w = images_NCHW.shape
    assert c == 3, f"expected RGB images, got {c} channels"
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), np.float64)
    for i, img in enumerate(np.clip(images_NCHW, 0, 1)):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img.transpose(1, 2, 0)
    return (grid * 255).round().astype(np.uint8)


MIN_TILE = 128
"""Pixels a tile is (nearest-neighbour) upscaled to at least, so 32/64 px images read in the MLflow UI."""


def labelled_grid(images_NCHW: np.ndarray, row_labels: list[str], pad: int = 2, numbered: bool = False) -> np.ndarray:
    """One row of images per label (``len(images) / len(row_labels)`` each), tiles upscaled to at
    least :data:`MIN_TILE` px, each row's label written in a margin on its left; ``numbered``
    writes each tile's index (0, 1, … in reading order: what ``c2f refine --select`` takes) on a
    black box in its top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    images_NCHW = np.asarray(images_NCHW)
    n, rows = len(images_NCHW), len(row_labels)
    assert rows and n % rows == 0, f"{n} images do not split into {rows} labelled rows"
    k = -(-MIN_TILE // images_NCHW.shape[-2])  # integer upscale factor
    big = images_NCHW.repeat(k, axis=-2).repeat(k, axis=-1)  # (N, 3, kH, kW)
    grid = image_grid(big, n // rows, pad)
    font = ImageFont.load_default()
    margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in row_labels)
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw, tile = ImageDraw.Draw(canvas), big.shape[-2] + pad
    for r, text in enumerate(row_labels):
        draw.text((4, pad + r * tile + tile // 2), text, fill="black", font=font, anchor="lm")
    for i in range(n) if numbered else []:
        r, q = divmod(i, n // rows)
        x, y = margin + pad + q * tile, pad + r * tile
        box = draw.textbbox((x + 3, y + 2), str(i), font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill="black")
        draw.text((x + 3, y + 2), str(i), fill="white", font=font)
    return np.asarray(canvas)


def log_image_grid(images_NCHW: np.ndarray, artifact_file: str, step: int | None = None,
                   row_labels: list[str] | None = None) -> None:
    """Log a sample/reconstruction grid as an image artifact (``step`` keeps one per step): with
    ``row_labels``, one labelled row per label (see :func:`labelled_grid`), else a square grid."""
    grid = labelled_grid(images_NCHW, row_labels) if row_labels else image_grid(np.asarray(images_NCHW))
    if step is None:
        mlflow.log_image(grid, artifact_file=artifact_file)
    else:
        mlflow.log_image(grid, key=artifact_file, step=step)


def log_table(rows: list[dict], artifact_file: str) -> None:
    """Log rows as an MLflow table artifact (JSON, viewable in the UI) and as CSV next to it."""
    import pandas as pd

    df = pd.DataFrame(rows)
    mlflow.log_table(df, artifact_file=artifact_file)
    mlflow.log_text(df.to_csv(index=False), str(Path(artifact_file).with_suffix(".csv")))


@dataclass
class MlflowLogger:
    """Logs into an existing run from any process (e.g. a Ray Train worker); picklable."""

    tracking: TrackingConfig
    run_id: str

    def _client(self) -> mlflow.MlflowClient:
        set_store(self.tracking)
        return mlflow.MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client().log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def logged_steps(self, key: str = "loss") -> set[int]:
        """Steps at which ``key`` is already in the run (one ``log_metrics`` call is one atomic
        batch, so a step with ``key`` is complete): a resumed run skips them."""
        return {m.step for m in self._client().get_metric_history(self.run_id, key)}

    def log_images(self, images_NCHW: np.ndarray, name: str, step: int, row_labels: list[str]) -> None:
        self._client().log_image(self.run_id, labelled_grid(images_NCHW, [f"{t}, step {step + 1}" for t in row_labels]),
                                 key=name, step=step)
