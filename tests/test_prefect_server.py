"""`prefect deployment run full-pipeline/demo` against a real Prefect server and process worker:
server on 127.0.0.1 with a temporary PREFECT_HOME, `c2f deploy` (work pool + infra/prefect.yaml),
a worker, the run to Completed, then its datasets and MLflow runs. Everything started is stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from coarse2fine.preprocess import schema

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}{path}", timeout=10) as r:
        return json.loads(r.read())


def post(api: str, path: str, body: dict) -> list | dict:
    req = urllib.request.Request(f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_deployment_runs_through_server_and_worker(tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_WRAP_LINES": "false"}
    port = api.rsplit(":", 1)[1].split("/")[0]
    logs = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    worker_log = open(tmp_path / "worker.log", "w")
    try:
        deadline = time.time() + 180
        while True:
            try:
                get(api, "/health")
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)

        workdir = tmp_path / "wd"  # where runs start: a folder with the checkout's configs/ and infra/
        workdir.mkdir()
        for name in ("configs", "infra"):
            (workdir / name).symlink_to(REPO / name)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        bad = subprocess.run([str(BIN / "c2f"), "deploy", "--workdir", str(elsewhere)], env=env, capture_output=True,
                             text=True, cwd=elsewhere, timeout=300)
        assert bad.returncode == 2 and "infra/prefect.yaml" in bad.stderr and len(bad.stderr.splitlines()) == 1
        subprocess.run([str(BIN / "c2f"), "deploy", "--workdir", str(workdir)],  # from any folder, default file
                       env=env, check=True, capture_output=True, cwd=elsewhere, timeout=300)
        nightly = get(api, "/deployments/name/full-pipeline/nightly-retrain")
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
        assert nightly["parameters"]["retrain"] is True and nightly["work_pool_name"] == "c2f-process"

        params = {"config": [str(REPO / "configs/tiny.yaml")], "demo_images": 12,
                  "overrides": ["data.source=imgs", f"storage.root={workdir}/store",
                                f"tracking.uri=sqlite:///{workdir}/mlflow.db"]}
        ran = subprocess.run([str(BIN / "prefect"), "deployment", "run", "full-pipeline/demo",
                              "--params", json.dumps(params)], env=env, check=True, capture_output=True, text=True)
        run_id = re.search(r"UUID\('([0-9a-f-]{36})'\)|([0-9a-f]{8}-[0-9a-f-]{27})", ran.stdout)
        assert run_id, ran.stdout
        run_id = run_id.group(1) or run_id.group(2)

        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "c2f-process", "--run-once"],
                                  env=env, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 900
        state = None
        while time.time() < deadline:
            state = get(api, f"/flow_runs/{run_id}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
        # The run's state reaches the server before its last log batch: the flow-run process
        # ships logs in the background and drains them at exit, after which the --run-once worker
        # exits. Read the logs once the worker is gone (or after a bounded wait for them).
        try:
            worker.wait(120)
        except subprocess.TimeoutExpired:
            pass
        log_deadline = time.time() + 60
        while True:
            logs_text = "\n".join(entry["message"] for entry in post(api, "/logs/filter", {
                "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 200}))
            if "summary" in logs_text or time.time() > log_deadline:
                break
            time.sleep(2)
        assert state and state["type"] == "COMPLETED", (state, logs_text[-4000:],
                                                        (tmp_path / "worker.log").read_text()[-3000:])
        assert "summary" in logs_text and "generator" in logs_text, logs_text[:4000]

        # the run worked in the deployment's working directory: relative data.source landed there
        assert len(list((workdir / "imgs").rglob("*.png"))) == 12
        names = {p.parent.parent.name for p in (workdir / "store").glob("*/*/_manifest.json")}
        assert {"images", "rejected", "spectral", "decomposition", "tokens"} <= names
        manifests = {p.parent.parent.name: schema.read_manifest(str(p.parent))
                     for p in (workdir / "store").glob("*/*/_manifest.json")}
        counts = manifests["images"]["counts"]
        assert counts["inputs"] == 12 == counts["images"] + counts["duplicates"] + counts["rejected"]
        assert manifests["images"]["rows"] == counts["images"] > 0
        for name in ("spectral", "decomposition", "tokens"):
            assert manifests[name]["rows"] == manifests["images"]["rows"], name
        mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
        runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
        assert sorted(r.data.tags["c2f.kind"] for r in runs) == ["comparison", "generator", "tokenizer"]
        assert all(r.data.tags["c2f.status"] == "finished" and r.info.status == "FINISHED" for r in runs
                   if r.data.tags["c2f.kind"] != "comparison")
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
        logs.close()
        worker_log.close()
