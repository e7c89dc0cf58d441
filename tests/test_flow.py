"""The Prefect flow `full-pipeline` on configs/tiny.yaml with Prefect's ephemeral API: every
dataset and model, reuse on a re-run, a failing stage and the resume with generator-only
retraining, and nightly retraining (new images only, warm starts)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from gcsfs.retry import HttpError

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
def test_full_pipeline_reuses_retrains_fails_and_resumes(tmp_path, prefect_env, capsys):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogWorker

    from coarse2fine.pipelines.cli import main
    from coarse2fine.pipelines.flows import format_summary, full_pipeline

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
    printed = format_summary(again)  # what `c2f run` prints and the flow logs
    assert "built" not in printed and "trained" not in printed
    assert all(d["uri"] in printed for d in again["datasets"]) and gen["run_id"] in printed and "fid" in printed

    # a stage that raises fails the flow run with its error in the run's logs, `c2f run` says it in
    # one line and exits 2; nothing finished is lost
    missing = tmp_path / "missing-inception.pt"
    sets = [a for o in overrides(tmp_path, "generator.train.max_steps=4", f"evaluate.fid_weights={missing}")
            for a in ("--set", o)]
    assert main(["run", "--config", tiny[0], *sets]) == 2
    assert "missing-inception.pt" in capsys.readouterr().err
    APILogWorker.drain_all(timeout=30)  # logs ship in the background
    with get_client(sync_client=True) as client:
        (failed,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert failed.state.is_failed() and "missing-inception.pt" in failed.state.message
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[failed.id])))
    assert any("missing-inception.pt" in entry.message for entry in logs)

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
                                           (HttpError({"code": 503, "message": "backend"}), True),
                                           (HttpError({"code": 403, "message": "forbidden"}), False),
                                           (ValueError("bad config"), False), (KeyError("class"), False)])
def test_only_transient_errors_are_retried(error, retried):
    from prefect.states import Failed

    from coarse2fine.pipelines.flows import _transient

    assert _transient(None, None, Failed(data=error)) is retried
