"""MLflow round trip on a real sqlite store: what an evaluation logs, `c2f compare` reads back."""

from __future__ import annotations


import mlflow
import numpy as np
import pytest
from PIL import Image

from coarse2fine.evaluate import tracking
from coarse2fine.evaluate.compare import runs_table
from coarse2fine.evaluate.config import TrackingConfig
from coarse2fine.pipelines.cli import main

pytestmark = pytest.mark.slow


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": "1", "a.c.d": "None", "e": "[1, 2]"}


def test_image_grid_tiles_images():
    imgs = np.zeros((5, 3, 4, 4))
    imgs[2] = 1.0
    grid = tracking.image_grid(imgs, nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:5, 11:15] == 255).all() and (grid[1:5, 1:5] == 0).all()


def test_labelled_grid_upscales_tiles_and_labels_each_row():
    """Tiles are the inputs repeated k×k (an independent nearest upscale via np.kron), one row per
    label, each label drawn (dark pixels) in the margin beside its own row only."""
    rng = np.random.default_rng(0)
    imgs = rng.random((6, 3, 32, 32))
    grid = tracking.labelled_grid(imgs, ["original", "reconstruction"], pad=2)
    k = -(-tracking.MIN_TILE // 32)
    tile = 32 * k
    margin = grid.shape[1] - (3 * (tile + 2) + 2)
    assert grid.shape[0] == 2 * (tile + 2) + 2 and margin > 0
    for i, img in enumerate(imgs):
        r, q = divmod(i, 3)
        y, x = 2 + r * (tile + 2), margin + 2 + q * (tile + 2)
        expected = np.kron(img.transpose(1, 2, 0), np.ones((k, k, 1)))
        np.testing.assert_allclose(grid[y:y + tile, x:x + tile] / 255, expected, atol=0.5 / 255 + 1e-9)
    dark = (grid[:, :margin] < 128).all(axis=-1)  # label text
    rows = [dark[2 + r * (tile + 2): 2 + r * (tile + 2) + tile].sum() for r in range(2)]
    assert all(n > 20 for n in rows) and dark.sum() == sum(rows)
    assert dark[: 2 + tile].sum() < dark[2 + tile:].sum()  # "reconstruction" is the longer word
    # numbered tiles (what `c2f refine --select` counts): a black box with white digits in each
    # tile's top-left corner, the rest of the tile untouched
    white = np.ones((4, 3, 32, 32))
    numbered = tracking.labelled_grid(white, ["samples"], pad=2, numbered=True)
    m = numbered.shape[1] - (4 * (tile + 2) + 2)
    for i in range(4):
        corner = numbered[2:16, m + 2 + i * (tile + 2): m + 2 + i * (tile + 2) + 12]
        assert (corner == 0).all(axis=-1).any() and (corner == 255).all(axis=-1).any(), i
        assert (numbered[40:2 + tile, m + 2 + i * (tile + 2) + 20: m + i * (tile + 2) + tile] == 255).all()
    assert (tracking.labelled_grid(white, ["samples"], pad=2)[2:16, m + 2: m + 14] == 255).all()
    with pytest.raises(AssertionError, match="do not split into 4 labelled rows"):
        tracking.labelled_grid(imgs, ["a", "b", "c", "d"])


def test_logged_evaluation_is_read_back_by_compare(tmp_path, capsys):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp-a")
    ids = {}
    for name, fid, psnr in (("sit-small", 12.5, 24.0), ("vit-vq", 20.25, 21.5)):
        with tracking.run(cfg, run_name=name, tags={"c2f.method": name.split("-")[0]}) as r:
            tracking.log_config({"tokenizer": {"method": name}, "train": {"max_steps": 3}})
            for step, v in enumerate((fid * 2, fid)):
                mlflow.log_metric("fid", v, step=step)
            mlflow.log_metric("psnr", psnr)
            tracking.log_image_grid(np.random.default_rng(0).random((4, 3, 8, 8)), "samples/grid.png")
            tracking.log_table([{"resolution": 32, "psnr": psnr}], "tables/per_resolution.json")
            ids[name] = r.info.run_id

    run = mlflow.get_run(ids["sit-small"])
    assert run.data.params["tokenizer.method"] == "sit-small" and run.data.params["train.max_steps"] == "3"
    history = mlflow.MlflowClient().get_metric_history(ids["sit-small"], "fid")
    assert [(m.step, m.value) for m in history] == [(0, 25.0), (1, 12.5)]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(ids["sit-small"], "tables")}
    assert {"tables/per_resolution.json", "tables/per_resolution.csv"} <= arts

    table = runs_table(cfg, "exp-a", ["fid", "psnr"])
    assert dict(zip(table["run_name"], table["fid"])) == {"sit-small": 12.5, "vit-vq": 20.25}

    png = tmp_path / "cmp.png"
    rc = main(["compare", "--experiment", "exp-a", "--metric", "fid", "--metric", "psnr",
               "--set", f"tracking.uri={cfg.uri}", "--png", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sit-small" in out and "12.5000" in out and "20.2500" in out and "21.5000" in out
    assert Image.open(png).size[0] > 400
    cmp_id = out.split("logged as MLflow run ")[1].split()[0]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(cmp_id, "comparison")}
    assert {"comparison/runs.json", "comparison/cmp.png"} <= logged
    # the comparison run itself is not listed as a run to compare
    assert len(runs_table(cfg, "exp-a", ["fid"])) == 2


def test_compare_unknown_experiment_is_a_user_error(tmp_path, capsys):
    rc = main(["compare", "--experiment", "nope", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db",
               "--png", str(tmp_path / "c.png")])
    assert rc == 2 and "no MLflow experiment" in capsys.readouterr().err


def test_a_longer_run_continues_only_when_its_phases_stay_where_the_shorter_one_passed_them():
    """Warm-up (10%) and the adversarial start (50%) are fractions of max_steps: continuing 6 → 9
    keeps both before step 6; 6 → 13 would start the discriminator at 6.5 (off again from 6);
    without a discriminator only the warm-up counts (6 → 60 ok, 6 → 61 moves it to 6.1)."""
    from coarse2fine.pipelines.runs import _phases_kept

    gan = {"warmup_frac": 0.1, "adversarial_weight": 0.1, "adversarial_start": 0.5}
    assert _phases_kept(gan, 6, 9) and _phases_kept(gan, 6, 12) and not _phases_kept(gan, 6, 13)
    plain = gan | {"adversarial_weight": 0.0}
    assert _phases_kept(plain, 6, 13) and _phases_kept(plain, 6, 60) and not _phases_kept(plain, 6, 61)
    assert _phases_kept({"warmup_frac": 0.1}, 300, 3000)  # a generator: warm-up only
