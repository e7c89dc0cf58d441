"""Training through ``ray.address`` on a Ray cluster started outside the process, as on a real
cluster: ``ray start --head`` plus one more ``ray start --address`` node on this machine, and
``c2f train-tokenizer`` as a separate driver process with two training workers."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import write_demo

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def cluster():
    """Two nodes of 2 CPUs each. This process's own local Ray (started by earlier tests) is shut
    down first: while a `ray start` cluster runs, `ray.init()` without an address would join it,
    and `ray stop` (the cleanup) stops every Ray process on the machine."""
    import ray

    ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # token authentication, as Ray's clusters use it: every node and driver gets the cluster's token
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                       check=True, capture_output=True, env=env, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2"],
                       check=True, capture_output=True, env=env, timeout=180)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=180)


def test_two_workers_train_on_a_cluster_started_with_ray_start(cluster, tmp_path):
    address, env = cluster
    write_demo(tmp_path / "imgs", 12)
    c2f = str(Path(sys.executable).with_name("c2f"))
    cmd = [c2f, "train-tokenizer", "--config", str(REPO / "configs/tiny.yaml"),
           "--set", f"data.source={tmp_path}/imgs", "--set", f"storage.root={tmp_path}/store",
           "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--set", f"ray.address={address}",
           "--set", "tokenizer.train.num_workers=2", "--set", "tokenizer.train.torch_threads=1",
           "--set", "tokenizer.train.log_every=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Ray: cluster at {address}, 2 node(s), 4 CPUs" in out.stderr  # joined, did not start its own
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert run.data.tags["c2f.status"] == "finished"
    steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(int(run.data.params["tokenizer.train.max_steps"])))
