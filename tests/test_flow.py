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
    assert all(d["uri"] in printed for d in again["datasets"]) and gen["run_id"] in printed
    assert "fid ↓" in printed and "(n=8)" in printed and "psnr ↑" in printed  # direction and sample count

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
    # one comparison per new set of evaluated runs: the re-run reused the first, the failed run had none
    assert sorted(r.data.tags.get("c2f.kind") for r in runs) == ["comparison", "comparison", "generator", "generator",
                                                                 "tokenizer"]
    assert again["comparison"]["reused"] and again["comparison"]["run_id"] == first["comparison"]["run_id"]

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


@pytest.mark.slow
def test_flow_compares_pairs_and_a_failing_pair_fails_alone(tmp_path, prefect_env, capsys, monkeypatch):
    """Three pairs on tiny data, one of which cannot train (CART order 3 over an order-2
    decomposition): the other two finish and are compared, the flow run ends Failed naming the
    pair; the fixed re-run reuses both and trains only CART (through a Prefect retry of a transient
    error planted once); `c2f compare --methods` reads the same table back, and runs of another
    evaluation protocol are refused."""
    import pandas as pd
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    from coarse2fine.evaluate import compare
    from coarse2fine.evaluate.config import TrackingConfig
    from coarse2fine.pipelines.cli import main
    from coarse2fine.pipelines.flows import full_pipeline

    tiny = [str(REPO / "configs/tiny.yaml")]
    broken = 'pairs=[sit:ar_sit, kl:mar, {pair: "cart:cart", overrides: {tokenizer.cart.order: 3}}]'
    state = full_pipeline(tiny, overrides(tmp_path, broken), demo_images=12, return_state=True)
    assert state.is_failed() and "cart:cart" in state.message and "order 2" in state.message
    assert "sit:ar_sit" not in state.message and "kl:mar" not in state.message
    first = state.result(raise_on_failure=False)
    outcome = {p["pair"]: p for p in first["pairs"]}
    assert [outcome[p]["status"] for p in ("sit:ar_sit", "kl:mar", "cart:cart")] == ["finished", "finished", "failed"]
    assert outcome["cart:cart"]["error"].startswith("train-tokenizer[cart]:")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    comparison = mlflow.get_run(first["comparison"]["run_id"])
    assert comparison.data.tags["c2f.kind"] == "comparison"
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(comparison.info.run_id, "comparison")}
    assert logged == {f"comparison/{f}" for f in ("methods.md", "methods.csv", "fid_vs_speed.png", "psnr_vs_tokens.png")}
    table = pd.read_csv(next(f for f in first["comparison"]["files"] if f.endswith(".csv")))
    assert list(table["pair"]) == ["sit:ar_sit", "kl:mar"]
    # every cell against what the pair's own runs logged (and the shapes of the tiny config)
    for row in table.itertuples():
        gen = mlflow.get_run(row.generator_run)
        tok = mlflow.get_run(gen.data.tags["c2f.tokenizer_run"])
        assert row.tokenizer_run == tok.info.run_id and row.fid == pytest.approx(gen.data.metrics["fid"])
        assert row.psnr == pytest.approx(tok.data.metrics["psnr"]) and row.fid_n == 8 and row.cfg == 2.0 and row.eval_batch == 16
        assert row.generator_train_min > 0 and row.tokenizer_mparams > 0 and row.images_per_s > 0
    sit, kl = table.iloc[0], table.iloc[1]
    assert (sit.tokens, sit.tokens_per_image, sit.bits_per_image) == ("discrete", 12, 12 * 6)  # 3 scales × 4, K=64
    assert sit.transformer_passes == 12 and sit.diffusion_passes == 0
    assert (kl.tokens, kl.tokens_per_image) == ("continuous", 4 * 4 * 4) and kl.bits_per_image != kl.bits_per_image
    assert kl.diffusion_passes == kl.transformer_passes * 4  # tiny: 4 DDIM steps per MAR step
    assert "| sit:ar_sit | discrete | inception | 12 | 72 |" in first["comparison"]["markdown"]

    # the fixed re-run, with a transient error planted in the first tokenize call: Prefect retries it
    from coarse2fine.pipelines import stages

    real, calls = stages.tokenize, []

    def flaky(cfg, run_id):  # pairs may run at once: the planted error is sit's first call, whichever comes first
        calls.append((cfg.tokenizer.method, run_id))
        if calls.count(("sit", run_id)) == 1 and cfg.tokenizer.method == "sit":
            raise ConnectionResetError("peer reset (planted, once)")
        return real(cfg, run_id)

    monkeypatch.setattr(stages, "tokenize", flaky)
    fixed = full_pipeline(tiny, overrides(tmp_path, "pairs=[sit:ar_sit, kl:mar, cart:cart]"), return_state=True)
    assert fixed.is_completed() and len(calls) == 4 and [m for m, _ in calls].count("sit") == 2  # sit's was retried
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fixed.state_details.flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["tokenize[sit]"])))
    assert [(r.run_count, r.state.is_completed()) for r in runs] == [(2, True)]
    again = fixed.result()
    trained = {r["method"]: r["trained"] for r in again["runs"]}
    assert trained == {"sit": False, "ar_sit": False, "kl": False, "mar": False, "cart": True}
    assert all(d["reused"] for d in again["datasets"] if d["dataset"] != "tokens")
    assert {p["pair"] for p in again["pairs"] if p["status"] == "finished"} == {"sit:ar_sit", "kl:mar", "cart:cart"}

    assert main(["compare", "--methods", "--config", tiny[0], "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                 "--set", f"storage.root={tmp_path}/store"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {p} |" in printed for p in ("sit:ar_sit", "kl:mar", "cart:cart"))

    # a run evaluated under another protocol (e.g. another guidance) is refused, in one line
    tracking_cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="tiny")
    runs = compare.latest_method_runs(tracking_cfg, "tiny")
    mlflow.MlflowClient().set_tag(runs[0], compare.PROTOCOL_TAG, "another-protocol")
    with pytest.raises(ValueError, match="refusing to compare runs of different generator evaluation protocols"):
        compare.method_table(tracking_cfg, runs)
