"""Concurrent writers and crashes: the dataset commit protocol (``preprocess/commit_protocol.py``).

Fast tests drive ``commit_protocol.begin`` / ``commit_protocol.commit`` directly with planted claims and
attempts (a dead pid is that of a finished child process); the slow tests run real ``c2f preprocess``
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

from coarse2fine.preprocess import commit_protocol, schema, storage

REPO = Path(__file__).resolve().parents[1]
STAGES = ("images", "rejected", "spectral", "decomposition")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def attempt_with_rows(uri: str, run_id: str, keys: list[str]) -> tuple[commit_protocol.Attempt, dict]:
    attempt = commit_protocol.begin(uri, run_id)
    shard = storage.write_shard(attempt.folder, storage.shard_name(run_id, 0), pa.table({"key": keys}))
    fields = dict(stage="t", fp=Path(uri).name, config={}, inputs={}, code="c", shards=[shard])
    return attempt, fields


def glob_keys(uri: str) -> list[str]:
    return sorted(r[0] for r in duckdb.sql(f"select key from '{uri}/part-*.parquet'").fetchall())


def test_the_second_of_two_runs_reuses_and_leaves_no_rows(tmp_path):
    uri = str(tmp_path / "t" / "fp")
    first = attempt_with_rows(uri, "aaaa", ["a", "b", "c"])
    second = attempt_with_rows(uri, "bbbb", ["a", "b", "c"])  # written at the same time
    assert commit_protocol.commit([first])
    assert not commit_protocol.commit([second])
    assert glob_keys(uri) == ["a", "b", "c"]  # not 6 rows
    assert sorted(p.name for p in Path(uri).iterdir()) == [schema.MANIFEST, "part-00000-aaaa.parquet"]


def test_leftovers_of_a_crashed_publisher_and_dead_attempts_are_removed(tmp_path):
    """A run killed while publishing left a moved shard and no manifest, another killed while
    writing its attempt folder (no process holds its lock): the next publisher removes both and
    keeps the attempt folder of a live run (this process holds its lock)."""
    uri = tmp_path / "t" / "fp"
    uri.mkdir(parents=True)
    duckdb.sql(f"copy (select 'stale' as key) to '{uri}/part-00000-dead.parquet'")
    (uri / f"{commit_protocol.ATTEMPT_PREFIX}dead2").mkdir()  # written by a process that is gone: no lock on it
    (uri / f"{commit_protocol.ATTEMPT_PREFIX}dead2" / "part-00000-dead2.parquet").write_bytes(b"partial")
    live_attempt = commit_protocol.begin(str(uri), "live")
    assert commit_protocol.commit([attempt_with_rows(str(uri), "cccc", ["x"])])
    assert glob_keys(str(uri)) == ["x"]
    left = sorted(p.name for p in uri.iterdir())
    assert left == sorted([schema.MANIFEST, "part-00000-cccc.parquet", f"{commit_protocol.ATTEMPT_PREFIX}live"]), left
    commit_protocol.discard(live_attempt)
    assert sorted(p.name for p in uri.iterdir()) == [schema.MANIFEST, "part-00000-cccc.parquet"]


def test_a_killed_writer_holds_nothing_and_a_reuse_sweeps_its_folder(tmp_path):
    """kill -9 of a writer (a child process that opened an attempt and died): the kernel drops its
    lock, so reusing the complete dataset removes the folder it left."""
    uri = tmp_path / "t" / "fp"
    assert commit_protocol.commit([attempt_with_rows(str(uri), "gggg", ["k"])])
    code = ("import os, sys; from coarse2fine.preprocess import commit_protocol; "
            f"commit_protocol.begin({str(uri)!r}, 'killed'); os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (uri / f"{commit_protocol.ATTEMPT_PREFIX}killed").is_dir()
    commit_protocol.sweep(str(uri))
    assert sorted(p.name for p in uri.iterdir()) == [schema.MANIFEST, "part-00000-gggg.parquet"]


def test_object_store_claims_wait_take_over_when_old_and_release_only_their_own(monkeypatch):
    """memory:// stands for an object store (claim objects, not kernel locks)."""
    import fsspec

    uri = f"memory://c2f-test-{time.time_ns()}/t/fp"
    fs = fsspec.filesystem("memory")
    claim = f"{uri.split('://')[1]}/{commit_protocol.CLAIM}"
    fs.pipe(claim, json.dumps({"run_id": "far", "host": "another-host", "pid": 1, "time": time.time()}).encode())
    commit_protocol._release_object(uri, "mine")  # not ours: stays
    assert fs.exists(claim)
    monkeypatch.setattr(commit_protocol, "COMMIT_STALE_S", 1.0)
    attempt = commit_protocol.begin(uri, "dddd")
    shard = storage.write_shard(attempt.folder, storage.shard_name("dddd", 0), pa.table({"key": ["y"]}))
    t0 = time.perf_counter()
    assert commit_protocol.commit([(attempt, dict(stage="t", fp="fp", config={}, inputs={}, code="c", shards=[shard]))])
    assert time.perf_counter() - t0 >= 0.9  # it waited for the other host's claim to go stale
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(uri.split("://")[1], detail=False))
    assert names == [schema.MANIFEST, "part-00000-dddd.parquet"]  # claim released, attempt gone
    # a claim of this host whose process is gone is taken over at once
    uri2 = f"{uri}-2"
    fs.pipe(f"{uri2.split('://')[1]}/{commit_protocol.CLAIM}", json.dumps(
        {"run_id": "dead", "host": socket.gethostname(), "pid": dead_pid(), "time": time.time()}).encode())
    attempt = commit_protocol.begin(uri2, "hhhh")
    shard = storage.write_shard(attempt.folder, storage.shard_name("hhhh", 0), pa.table({"key": ["z"]}))
    t0 = time.perf_counter()
    assert commit_protocol.commit([(attempt, dict(stage="t", fp="fp", config={}, inputs={}, code="c", shards=[shard]))])
    assert time.perf_counter() - t0 < 0.9


def test_a_publishing_run_is_waited_for_and_its_dataset_reused(tmp_path):
    """Another run holds the dataset's lock while it publishes (a second descriptor of this process
    stands for it): this run waits, then finds the dataset complete, discards its attempt and
    reports reuse."""
    uri = str(tmp_path / "t" / "fp")
    other = attempt_with_rows(uri, "eeee", ["k"])
    mine = attempt_with_rows(uri, "ffff", ["k"])
    fd = commit_protocol._claim_local(uri)

    def publish_then_release():
        time.sleep(1.0)
        commit_protocol._publish(*other)
        os.close(fd)

    threading.Thread(target=publish_then_release).start()
    t0 = time.perf_counter()
    assert not commit_protocol.commit([mine])
    assert time.perf_counter() - t0 >= 0.9
    assert glob_keys(uri) == ["k"]
    assert sorted(p.name for p in Path(uri).iterdir()) == [schema.MANIFEST, "part-00000-eeee.parquet"]


def test_the_marker_is_claimed_first_and_a_lost_race_discards_every_part(tmp_path):
    """Ingest publishes ``rejected`` then ``images`` (the marker). A run that finds ``images``
    complete publishes neither, even where ``rejected`` is incomplete."""
    rej, img = str(tmp_path / "rejected" / "fp"), str(tmp_path / "images" / "fp")
    assert commit_protocol.commit([attempt_with_rows(img, "gggg", ["i"])])
    parts = [attempt_with_rows(rej, "hhhh", ["r"]), attempt_with_rows(img, "hhhh", ["i"])]
    assert not commit_protocol.commit(parts)
    assert not Path(rej, schema.MANIFEST).exists() and not any(Path(rej).iterdir())


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
            manifest = schema.read_manifest(str(d))
            assert manifest is not None, d
            names = sorted(p.name for p in d.iterdir()
                           if p.name.startswith(("part-", commit_protocol.ATTEMPT_PREFIX, "_commit")))
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
