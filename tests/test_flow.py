"""The Prefect flow `full-pipeline` on configs/tiny.yaml with Prefect's ephemeral API: every
dataset and model, reuse on a re-run, a failing stage and the resume with generator-only
retraining, and nightly retraining (new images only, warm starts)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from coarse2fine.preprocess import schema

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"images", "rejected", "spectral", "decomposition", "tokens"}


@pytest.fixture
def prefect_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield
    import ray

    ray.shutdown()


def overrides(tmp: Path, *extra: str) -> list[str]:
    return [f"data.source={tmp}/imgs", f"storage.root={tmp}/store", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            *extra]


@pytest.mark.slow
def test_full_pipeline_reuses_retrains_fails_and_resumes(tmp_path, prefect_env):
    from coarse2fine.pipelines.flows import full_pipeline

    tiny = [str(REPO / "configs/tiny.yaml")]
    first = full_pipeline(tiny, overrides(tmp_path), demo_images=12)
    assert {d["dataset"] for d in first["datasets"]} == DATASETS
    for d in first["datasets"]:
        manifest = schema.read_manifest(d["uri"])
        assert manifest is not None and manifest["rows"] == d["rows"] and not d["reused"]
    assert first["datasets"][0]["rows"] == 12
    tok, gen = first["runs"]
    assert (tok["kind"], gen["kind"]) == ("tokenizer", "generator") and tok["trained"] and gen["trained"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    for r in (tok, gen):
        run = mlflow.get_run(r["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["c2f.status"] == "finished"
        assert all(Path(g.removeprefix("file://")).is_file() for g in r["grids"])
    assert "fid" in gen["metrics"] and "psnr" in tok["metrics"]
    assert mlflow.get_run(gen["run_id"]).data.tags["c2f.tokenizer_run"] == tok["run_id"]

    again = full_pipeline(tiny, overrides(tmp_path))
    assert all(d["reused"] for d in again["datasets"])
    assert [r["run_id"] for r in again["runs"]] == [tok["run_id"], gen["run_id"]]
    assert not any(r["trained"] for r in again["runs"]) and all(r["reused"] for r in again["runs"])

    # a stage that raises fails the flow run with its error; nothing finished is lost
    missing = tmp_path / "missing-inception.pt"
    state = full_pipeline(tiny, overrides(tmp_path, "generator.train.max_steps=4", f"evaluate.fid_weights={missing}"),
                          return_state=True)
    assert state.is_failed() and "missing-inception.pt" in state.message

    # re-run: preprocessing, tokens and the tokenizer are reused, only the changed generator trains
    changed = full_pipeline(tiny, overrides(tmp_path, "generator.train.max_steps=4"))
    assert all(d["reused"] for d in changed["datasets"])
    new_tok, new_gen = changed["runs"]
    assert new_tok["run_id"] == tok["run_id"] and not new_tok["trained"] and new_tok["reused"]
    assert new_gen["run_id"] != gen["run_id"] and new_gen["trained"]
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert sorted(r.data.tags.get("c2f.kind") for r in runs) == ["generator", "generator", "tokenizer"]

    # nightly retraining: new uploads are ingested alone, both models continue from their latest runs
    from PIL import Image

    for f in sorted((tmp_path / "imgs").rglob("*.png"))[:4]:
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(f.with_name(f"flipped-{f.name}"))
    nightly = full_pipeline(tiny, overrides(tmp_path, "generator.train.max_steps=4"), retrain=True)
    images = next(d for d in nightly["datasets"] if d["dataset"] == "images")
    assert images["rows"] == 16 and not images["reused"]
    assert schema.read_manifest(images["uri"])["inputs"]["carried_over_from"] == first["datasets"][0]["uri"]
    warm_tok, warm_gen = nightly["runs"]
    assert warm_tok["trained"] and warm_gen["trained"]
    tok_tags, gen_tags = (mlflow.get_run(r["run_id"]).data.tags for r in (warm_tok, warm_gen))
    assert tok_tags["c2f.warm_start_from"] == tok["run_id"] and gen_tags["c2f.warm_start_from"] == new_gen["run_id"]
    client = mlflow.MlflowClient()
    first_loss = {r: client.get_metric_history(r, "loss")[0].value for r in (new_gen["run_id"], warm_gen["run_id"])}
    assert first_loss[warm_gen["run_id"]] < first_loss[new_gen["run_id"]]  # started from trained weights
    quiet = full_pipeline(tiny, overrides(tmp_path, "generator.train.max_steps=4"), retrain=True)
    assert [r["run_id"] for r in quiet["runs"]] == [warm_tok["run_id"], warm_gen["run_id"]]
    assert all(d["reused"] for d in quiet["datasets"]) and not any(r["trained"] for r in quiet["runs"])


@pytest.mark.parametrize("error,retried", [(ConnectionResetError("peer"), True), (TimeoutError(), True),
                                           (OSError("disk"), True), (FileNotFoundError("cfg"), False),
                                           (ValueError("bad config"), False), (KeyError("class"), False)])
def test_only_transient_errors_are_retried(error, retried):
    from prefect.states import Failed

    from coarse2fine.pipelines.flows import _transient

    assert _transient(None, None, Failed(data=error)) is retried
