"""Concurrent writers and crashes: the dataset commit protocol (``preprocess/storage.py``).

Fast tests drive ``storage.begin`` / ``storage.commit`` directly with planted claims and attempts
(a dead pid is that of a finished child process); the slow tests run real ``c2f preprocess``
processes at once, and kill -9 them at random moments, then check the folders with a glob, as a
duckdb or polars user would, against a clean run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from coarse2fine.preprocess import storage

REPO = Path(__file__).resolve().parents[1]
STAGES = ("images", "rejected", "spectral", "decomposition")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def attempt_with_rows(uri: str, run_id: str, keys: list[str]) -> tuple[storage.Attempt, dict]:
    attempt = storage.begin(uri, run_id)
    shard = storage.write_shard(attempt.folder, storage.shard_name(run_id, 0), pa.table({"key": keys}))
    fields = dict(stage="t", fp=Path(uri).name, config={}, inputs={}, code="c", shards=[shard])
    return attempt, fields


def glob_keys(uri: str) -> list[str]:
    return sorted(r[0] for r in duckdb.sql(f"select key from '{uri}/part-*.parquet'").fetchall())


def test_the_second_of_two_runs_reuses_and_leaves_no_rows(tmp_path):
    uri = str(tmp_path / "t" / "fp")
    first = attempt_with_rows(uri, "aaaa", ["a", "b", "c"])
    second = attempt_with_rows(uri, "bbbb", ["a", "b", "c"])  # written at the same time
    assert storage.commit([first])
    assert not storage.commit([second])
    assert glob_keys(uri) == ["a", "b", "c"]  # not 6 rows
    assert sorted(p.name for p in Path(uri).iterdir()) == [storage.MANIFEST, "part-00000-aaaa.parquet"]


def test_a_crashed_publisher_is_taken_over_and_its_files_removed(tmp_path):
    """A run killed while publishing left its claim, a moved shard and no manifest; the next run
    takes the claim over (same host, pid gone) and publishes only its own rows."""
    uri = tmp_path / "t" / "fp"
    uri.mkdir(parents=True)
    (uri / storage.CLAIM).write_text(json.dumps({"run_id": "dead", "host": socket.gethostname(),
                                                 "pid": dead_pid(), "time": time.time()}))
    duckdb.sql(f"copy (select 'stale' as key) to '{uri}/part-00000-dead.parquet'")
    dead_attempt = storage.begin(str(uri), "dead2")
    (Path(dead_attempt.folder) / storage.OWNER).write_text(json.dumps(
        {"run_id": "dead2", "host": socket.gethostname(), "pid": dead_pid(), "time": time.time()}))
    live_attempt = storage.begin(str(uri), "live")  # this process: alive, must be left alone
    assert storage.commit([attempt_with_rows(str(uri), "cccc", ["x"])])
    assert glob_keys(str(uri)) == ["x"]
    left = sorted(p.name for p in uri.iterdir())
    assert left == sorted([storage.MANIFEST, "part-00000-cccc.parquet", f"{storage.ATTEMPT_PREFIX}live"]), left
    assert Path(live_attempt.folder, storage.OWNER).exists()


def test_a_claim_from_another_host_is_waited_for_then_taken_over_when_old(tmp_path, monkeypatch):
    uri = tmp_path / "t" / "fp"
    uri.mkdir(parents=True)
    claim = {"run_id": "far", "host": "another-host", "pid": 1, "time": time.time()}
    (uri / storage.CLAIM).write_text(json.dumps(claim))
    part = attempt_with_rows(str(uri), "dddd", ["y"])
    monkeypatch.setattr(storage, "COMMIT_STALE_S", 1.0)
    t0 = time.perf_counter()
    assert storage.commit([part])
    assert time.perf_counter() - t0 >= 0.9  # it waited for the other host's claim to go stale
    assert glob_keys(str(uri)) == ["y"] and not (uri / storage.CLAIM).exists()


def test_a_live_claimant_that_completes_is_reused(tmp_path):
    """Another live run holds the claim (this process's pid stands for it) and publishes while
    this run waits: this run discards its attempt and reports reuse."""
    uri = str(tmp_path / "t" / "fp")
    other = attempt_with_rows(uri, "eeee", ["k"])
    Path(uri, storage.CLAIM).write_text(json.dumps({"run_id": "eeee", "host": socket.gethostname(),
                                                    "pid": os.getpid(), "time": time.time()}))
    mine = attempt_with_rows(uri, "ffff", ["k"])

    def publish_later():
        time.sleep(1.0)
        storage._publish(*other)
        Path(uri, storage.CLAIM).unlink()

    threading.Thread(target=publish_later).start()
    assert not storage.commit([mine])
    assert glob_keys(uri) == ["k"]
    assert sorted(p.name for p in Path(uri).iterdir()) == [storage.MANIFEST, "part-00000-eeee.parquet"]


def test_the_marker_is_claimed_first_and_a_lost_race_discards_every_part(tmp_path):
    """Ingest publishes ``rejected`` then ``images`` (the marker). A run that finds ``images``
    complete publishes neither, even where ``rejected`` is incomplete."""
    rej, img = str(tmp_path / "rejected" / "fp"), str(tmp_path / "images" / "fp")
    assert storage.commit([attempt_with_rows(img, "gggg", ["i"])])
    parts = [attempt_with_rows(rej, "hhhh", ["r"]), attempt_with_rows(img, "hhhh", ["i"])]
    assert not storage.commit(parts)
    assert not Path(rej, storage.MANIFEST).exists() and not any(Path(rej).iterdir())


# ---------------------------------------------------------------- real runs (slow)


def preprocess_cmd(src: Path, root: Path, *flags: str) -> list[str]:
    c2f = str(Path(sys.executable).with_name("c2f"))
    return [c2f, *flags, "preprocess", "--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.source={src}",
            "--set", f"storage.root={root}", "--set", "preprocess.num_workers=2"]


def datasets(root: Path) -> dict[str, dict[str, list[str]]]:
    """stage → fingerprint → sha256 of every file a ``part-*.parquet`` glob reads (sorted)."""
    return {stage: {d.name: sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in d.glob("part-*.parquet"))
                    for d in (root / stage).iterdir()} for stage in STAGES}


def assert_clean_folders(root: Path) -> None:
    """Every dataset folder is complete, and a glob over it reads exactly the manifest's rows."""
    for stage in STAGES:
        for d in (root / stage).iterdir():
            manifest = storage.read_manifest(str(d))
            assert manifest is not None, d
            names = sorted(p.name for p in d.iterdir() if p.name.startswith(("part-", storage.ATTEMPT_PREFIX, "_commit")))
            assert names == sorted(s["name"] for s in manifest["shards"]), (d, names)
            ((n,),) = duckdb.sql(f"select count(*) from '{d}/part-*.parquet'").fetchall()
            assert n == manifest["rows"], (d, n)


@pytest.fixture(scope="module")
def clean(demo_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    t0 = time.perf_counter()
    out = subprocess.run(preprocess_cmd(demo_folder, root, "--verbose"), check=True, capture_output=True,
                         text=True, timeout=600)
    return root, time.perf_counter() - t0, out.stderr


@pytest.mark.slow
def test_two_concurrent_preprocess_runs_publish_each_dataset_once(demo_folder, clean, tmp_path):
    root = tmp_path / "store"
    procs = [subprocess.Popen(preprocess_cmd(demo_folder, root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert_clean_folders(root)
    assert datasets(root) == datasets(clean[0])
    # the console: the 2 Beam worker processes of each stage stay quiet unless `c2f --verbose`
    for out in outs:
        assert "beam worker" not in out and "sdk_worker" not in out and "apitools" not in out, out
    assert "beam worker INFO" in clean[2]


@pytest.mark.slow
def test_preprocess_killed_at_random_moments_then_completed_equals_a_clean_run(demo_folder, clean, tmp_path):
    """kill -9 the whole process group (driver and Beam workers) at three seeded random moments
    within a clean run's duration, then run to the end: byte-identical shards, nothing stray."""
    root = tmp_path / "store"
    rng = random.Random(11)
    for _ in range(3):
        proc = subprocess.Popen(preprocess_cmd(demo_folder, root), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * clean[1])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    subprocess.run(preprocess_cmd(demo_folder, root), check=True, capture_output=True, timeout=600)
    assert_clean_folders(root)
    assert datasets(root) == datasets(clean[0])
