"""The user's path through the CLI on configs/tiny.yaml: demo data → train (resume, reuse) → evaluate →
compare, a killed run resumed, and the generator path (train, sample, refine, upsample, edit, evaluate)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import mlflow
import pytest
from conftest import assert_sample_grid
import torch

from coarse2fine.pipelines.cli import main
from coarse2fine.preprocess import schema
from coarse2fine.train.checkpoints import load_tokenizer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def sets(tmp: Path, *extra: str) -> list[str]:
    out = ["--config", str(REPO / "configs/tiny.yaml"),
           "--set", f"data.source={tmp}/imgs", "--set", f"storage.root={tmp}/store",
           "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
    for e in extra:
        out += ["--set", e]
    return out


def test_demo_train_evaluate_compare(tmp_path, capsys):
    import ray

    try:
        assert main(["demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]) == 0
        assert main(["train-tokenizer", *sets(tmp_path)]) == 0
        run_id = capsys.readouterr().out.split("tokenizer run ")[1].split()[0]
        assert main(["evaluate", "--run", run_id, *sets(tmp_path)]) == 0
        assert "psnr" in capsys.readouterr().out
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        run = mlflow.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["c2f.status"] == "finished"
        assert "eval/psnr_32px" in run.data.metrics and "eval/psnr_16px" in run.data.metrics
        assert "codebook_usage/scale_0" in run.data.metrics and run.data.params["tokenizer.method"] == "sit"
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "eval")}
        assert {"eval/per_resolution.json", "eval/reconstructions.png"} <= arts
        # the finished run carries its final model (weights only): it loads without the checkpoint store
        exported = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(tmp_path / "m"))
        stored = torch.load(Path(exported) / "state.pt", weights_only=False)
        assert set(stored) == {"model", "step", "kind", "method", "model_config"}
        assert stored["step"] == int(run.data.tags["c2f.max_steps"])
        final = load_tokenizer(run.data.tags["c2f.checkpoint"]).state_dict()
        assert all(torch.equal(v, final[k]) for k, v in load_tokenizer(exported).state_dict().items())

        # token shards: ids per scale equal the tokenizer's own encoding; a re-run is reused
        assert main(["tokenize", "--run", run_id, *sets(tmp_path)]) == 0
        tok_out = capsys.readouterr().out
        assert main(["tokenize", "--run", run_id, *sets(tmp_path)]) == 0
        assert "(reused)" in capsys.readouterr().out
        tokens_uri = mlflow.get_run(run_id).data.tags["c2f.tokens"]
        assert tokens_uri in tok_out.replace("\n", "")
        tokens = schema.read_table(tokens_uri)
        images = schema.read_table(run.data.tags["c2f.images"]).sort_by("key")
        assert tokens.num_rows == images.num_rows
        assert tokens.schema.field("ids_2").type.shape == [2, 2]
        model = load_tokenizer(mlflow.get_run(run_id).data.tags["c2f.checkpoint"])
        row = tokens.sort_by("key").slice(0, 1)
        x = torch.from_numpy(schema.decode_image(images.column("image")[0].as_py()))[None]
        _, idx, _ = model.encode(x)
        for s in range(3):
            assert schema.tensor_numpy(row.column(f"ids_{s}"))[0].ravel().tolist() == idx[0, s].tolist()
        # tokens contract v2: the manifest records the layout; duckdb reads the listed shards
        manifest = schema.read_manifest(tokens_uri)
        assert manifest["config"]["layout_version"] == 2 and manifest["config"]["method"] == "sit"
        assert manifest["config"]["layout"] == [{"name": f"ids_{s}", "shape": [2, 2], "dtype": "int32", "vocab": 64,
                                                 "role": "scale", "code_dim": 0, "scale": 1.0} for s in range(3)]
        listed = [str(u) for u in schema.shard_uris(tokens_uri)]
        first_key = row.column("key")[0].as_py()
        via_duckdb = duckdb.sql(f"select ids_2 from read_parquet({listed}) where key = '{first_key}'").fetchall()
        assert list(via_duckdb[0][0]) == idx[0, 2].tolist()
        # `inspect --png` of a tokens row: the image, its decoding from exactly these ids, 3 id maps
        from PIL import Image

        from coarse2fine.pipelines.apps import decoded_tokens_row

        caption, decoded = decoded_tokens_row(tokens_uri, first_key[:10])
        assert caption == "decoded by sit (exactly the row's ids)"
        np.testing.assert_allclose(decoded, model(x)[0][0].clamp(0, 1).permute(1, 2, 0).detach().numpy(), atol=1e-6)
        png = tmp_path / "tokens_row.png"
        assert main(["inspect", tokens_uri, "--key", first_key[:10], "--png", str(png)]) == 0
        assert Image.open(png).size == (1200, 600)  # 5 panels: 2 rows of 4, 3 in each at 100 dpi
        # codebook usage over the whole tokens dataset, logged by tokenize, recounted by duckdb
        metrics = mlflow.get_run(run_id).data.metrics
        for s in range(3):
            used = duckdb.sql(f"select count(distinct i) from (select unnest(ids_{s}) as i "
                              f"from read_parquet({listed}))").fetchall()[0][0]
            assert metrics[f"dataset/codebook_usage/scale_{s}"] == pytest.approx(used / 64)
        assert metrics["dataset/images"] == tokens.num_rows
        assert run.data.tags["c2f.perceptual"].startswith("LPIPS-style distance on the FID Inception stem")

        # same config again: the finished tokenizer is reused, not retrained
        assert main(["train-tokenizer", *sets(tmp_path)]) == 0
        assert "reused" in capsys.readouterr().out

        # a changed tokenizer: pause after 3 steps, then resume to the end in the same MLflow run
        assert main(["train-tokenizer", "--stop-after", "3", *sets(tmp_path, "tokenizer.method=vit_vq")]) == 0
        paused = capsys.readouterr().out.split("tokenizer run ")[1].split()[0]
        assert mlflow.get_run(paused).data.tags["c2f.status"] == "paused at step 3"
        assert main(["train-tokenizer", *sets(tmp_path, "tokenizer.method=vit_vq")]) == 0
        resumed = capsys.readouterr().out.split("tokenizer run ")[1].split()[0]
        assert resumed == paused and mlflow.get_run(resumed).data.tags["c2f.status"] == "finished"
        steps = [m.step for m in mlflow.MlflowClient().get_metric_history(resumed, "loss")]
        assert sorted(set(steps)) == list(range(6))
        # "train longer": a larger max_steps continues the finished 6-step run (full state) in a new run
        assert main(["train-tokenizer", *sets(tmp_path, "tokenizer.method=vit_vq", "tokenizer.train.max_steps=9")]) == 0
        longer = capsys.readouterr().out.split("tokenizer run ")[1].split()[0]
        longer_tags = mlflow.get_run(longer).data.tags
        assert longer != resumed and longer_tags["c2f.continued_from"] == resumed
        assert longer_tags["c2f.status"] == "finished"
        assert sorted(m.step for m in mlflow.MlflowClient().get_metric_history(longer, "loss")) == [6, 7, 8]
        state = torch.load(Path(longer_tags["c2f.checkpoint"]) / "state.pt", weights_only=False)
        assert state["step"] == 9 and state["scheduler"]["last_epoch"] == 9
        assert mlflow.get_run(resumed).data.tags["c2f.status"] == "finished"  # the 6-step run stays as it was

        assert main(["evaluate", "--run", resumed, *sets(tmp_path)]) == 0
        assert main(["compare", "--experiment", "tiny", "--metric", "psnr", "--metric", "rfid",
                     "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--png", str(tmp_path / "c.png")]) == 0
        table = capsys.readouterr().out
        assert "vit_vq" in table and "sit" in table and (tmp_path / "c.png").exists()

        # the baseline feeds AR-SIT through the same registry path: one column of 16 tokens
        vit = sets(tmp_path, "tokenizer.method=vit_vq")
        assert main(["train-generator", *vit]) == 0
        gen_run = capsys.readouterr().out.split("generator run ")[1].split()[0]
        gen_tags = mlflow.get_run(gen_run).data.tags
        assert gen_tags["c2f.tokenizer_run"] == resumed and gen_tags["c2f.method"] == "ar_sit"
        layout = schema.read_manifest(gen_tags["c2f.tokens"])["config"]["layout"]
        assert [(c["name"], c["shape"], c["vocab"]) for c in layout] == [("ids_0", [4, 4], 64)]
        out_png = tmp_path / "vit.png"
        assert main(["generate", "--run", gen_run, "--n", "2", "--out", str(out_png), *vit]) == 0
        assert_sample_grid(out_png, 2, 32)
        capsys.readouterr()
        assert main(["generate", "--run", gen_run, "--stop-scale", "1", *vit]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "--stop-scale is not supported by generator method ar_sit over tokenizer method vit_vq" in err
        assert "it supports: c2f generate" in err
        assert main(["upsample", "--run", gen_run, "--image", str(out_png), *vit]) == 2
    finally:
        ray.shutdown()


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL the whole `c2f train-tokenizer` process group mid-run, twice (the second time after the
    resumed invocation wrote a checkpoint); the last run resumes (no restart from step 0, no skipped
    or repeated step) and finishes in the same MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    c2f = str(Path(sys.executable).with_name("c2f"))
    demo = [c2f, "demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]
    subprocess.run(demo, check=True, capture_output=True)
    cmd = [c2f, "train-tokenizer", *sets(tmp_path, "tokenizer.train.max_steps=400",
                                         "tokenizer.train.checkpoint_every=20", "tokenizer.train.log_every=1",
                                         "tokenizer.train.adversarial_weight=0")]
    ckpt_root = tmp_path / "store" / "checkpoints"
    seen: set[Path] = set()
    for kill in range(2):  # the second kill hits a resumed invocation, after a checkpoint of its own
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and len(set(ckpt_root.glob("*/checkpoint_*")) - seen) < 2 - kill:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(set(ckpt_root.glob("*/checkpoint_*")) - seen) >= 2 - kill, f"no checkpoint before kill {kill + 1}"
        seen |= set(ckpt_root.glob("*/checkpoint_*"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    logged_before = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")}
    assert 0 < max(logged_before) < 399
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(400))  # every step once: none skipped, none logged again after a kill
    assert mlflow.get_run(run.info.run_id).data.tags["c2f.status"] == "finished"


def test_generator_train_sample_refine_upsample_edit_evaluate(tmp_path, capsys, monkeypatch):
    """AR-SIT through the CLI: train-generator (tokenizer + tokens first), resume after a pause,
    reuse; previews → refine; upsample; edit; the Table 2/4 evaluation logged to MLflow."""
    import ray

    from coarse2fine.preprocess.demo_data import demo_crops

    try:
        assert main(["demo-data", "--out", str(tmp_path / "imgs"), "--n", "12", "--resolution", "32"]) == 0
        assert main(["train-generator", "--stop-after", "3", *sets(tmp_path)]) == 0
        run_id = capsys.readouterr().out.split("generator run ")[1].split()[0]
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        assert mlflow.get_run(run_id).data.tags["c2f.status"] == "paused at step 3"
        assert main(["train-generator", *sets(tmp_path)]) == 0
        assert capsys.readouterr().out.split("generator run ")[1].split()[0] == run_id
        tags = mlflow.get_run(run_id).data.tags
        assert tags["c2f.status"] == "finished" and tags["c2f.kind"] == "generator"
        steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")]
        assert sorted(set(steps)) == list(range(6)) and steps.count(0) == 1
        assert main(["train-generator", *sets(tmp_path)]) == 0
        assert "(reused)" in capsys.readouterr().out
        splits = schema.read_table(tags["c2f.tokens"], ["split"]).column("split").to_pylist()
        assert "validation" in splits  # …and the generator saw only the train split
        assert mlflow.get_run(run_id).data.metrics["rows_per_worker"] == splits.count("train")

        prev = tmp_path / "prev.png"
        assert main(["generate", "--run", run_id, "--n", "3", "--stop-scale", "1", "--class", "0",
                     "--out", str(prev), *sets(tmp_path)]) == 0
        assert_sample_grid(prev, 3, 8)  # 3 numbered 8px previews
        assert main(["refine", "--run", run_id, "--tokens", f"{prev}.tokens.npz", "--select", "2",
                     "--out", str(tmp_path / "ref.png"), *sets(tmp_path)]) == 0
        import numpy as np
        coarse, refined = np.load(f"{prev}.tokens.npz")["ids"], np.load(tmp_path / "ref.png.tokens.npz")["ids"]
        assert refined.shape == (1, 12) and (refined[0, :4] == coarse[2]).all()
        two = tmp_path / "two.png"
        assert main(["refine", "--run", run_id, "--tokens", f"{tmp_path}/ref.png.tokens.npz", "--stop-scale", "2",
                     "--out", str(two), *sets(tmp_path)]) == 2  # would cut the given 3 scales
        assert "stop scale 2 would cut them" in capsys.readouterr().err and not two.exists()

        _, crop = next(demo_crops(1, 32, 5))
        crop.resize((16, 16)).save(tmp_path / "low.png")
        crop.save(tmp_path / "full.png")
        assert main(["upsample", "--run", run_id, "--image", str(tmp_path / "low.png"),
                     "--out", str(tmp_path / "up.png"), *sets(tmp_path)]) == 0
        assert main(["upsample", "--run", run_id, "--image", str(tmp_path / "full.png"),  # 32 → 32 is no upsampling
                     "--out", str(tmp_path / "up2.png"), *sets(tmp_path)]) == 2
        assert "upsample takes images smaller than the model's 32px" in capsys.readouterr().err
        assert main(["edit", "--run", run_id, "--image", str(tmp_path / "full.png"), "--keep-scales", "1",
                     "--class", "1", "--out", str(tmp_path / "ed.png"), *sets(tmp_path)]) == 0
        assert main(["generate", "--run", run_id, "--class", "no-such-class", *sets(tmp_path)]) == 2
        # self-contained runs: from another folder, without --config, the run's own config is used
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        capsys.readouterr()
        assert main(["generate", "--run", run_id, "--n", "2",
                     "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]) == 0
        assert f"the one run {run_id} was trained with" in capsys.readouterr().err
        # the default output goes to the ignored .c2f/out/, not into the working folder
        assert (elsewhere / ".c2f/out/grid.png").is_file() and not list(elsewhere.glob("*.png"))
        assert main(["generate", "--run", run_id, "--out", "own.png"]) == 2  # the default store here has no such run
        assert f"no MLflow run {run_id}" in capsys.readouterr().err
        monkeypatch.chdir(tmp_path)
        assert main(["generate", "--run", tags["c2f.tokenizer_run"], *sets(tmp_path)]) == 2
        capsys.readouterr()

        assert main(["evaluate", "--run", run_id, *sets(tmp_path)]) == 0
        assert "stop_scales" in capsys.readouterr().out
        metrics = mlflow.get_run(run_id).data.metrics
        for s, res in ((1, 8), (2, 16), (3, 32)):
            assert metrics[f"eval/resolution_stop{s}"] == res and f"eval/fid_stop{s}" in metrics
            assert metrics[f"eval/images_per_s_stop{s}"] > 0
        assert metrics["eval/kv_cache_kib_per_image_stop3"] == 3 * metrics["eval/kv_cache_kib_per_image_stop1"]
        assert "eval/upsample_psnr_from8px" in metrics and "fid" in metrics  # (1 held-out image: no upsampling FID)
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "eval")}
        assert {"eval/stop_scales.json", "eval/samples_per_stop_scale.png", "eval/upsampling.png"} <= arts
        samples = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "samples")}
        assert {"samples/prev.png", "samples/prev.png.tokens.npz", "samples/ref.png", "samples/ref.png.tokens.npz",
                "samples/up.png", "samples/ed.png"} <= samples
    finally:
        ray.shutdown()
