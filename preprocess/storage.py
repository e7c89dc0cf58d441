"""Writing datasets on fsspec storage: fingerprints, shards, and the manifest written last.

A dataset lives at ``{root}/{stage}/{fingerprint}/`` and is complete only once its
``_manifest.json`` exists. Readers take only the shards the manifest lists, so a crashed writer
never leaves anything readable; a folder without a manifest is cleared and rebuilt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import uuid
from pathlib import Path
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from coarse2fine import __version__
from coarse2fine.preprocess.schema import (  # noqa: F401  (reader side of the contract, re-exported)
    MANIFEST,
    SCHEMA_VERSION,
    IncompleteDatasetError,
    join,
    read_manifest,
    read_shard,
    read_table,
    shard_uris,
    url_to_fs,
)


def code_version(*modules: Any) -> str:
    """Hash of the package version and the source files of the modules a stage runs."""
    h = hashlib.sha256(__version__.encode())
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:12]


def fingerprint(stage: str, config: dict, inputs: Iterable[str], code: str) -> str:
    """hash(stage config + input fingerprints + code version of the stage) (DESIGN.md, Config)."""
    payload = json.dumps(
        {"stage": stage, "config": config, "inputs": sorted(inputs), "code": code},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def dataset_uri(root: str, stage: str, fp: str) -> str:
    return join(root, stage, fp)


def prepare_empty(uri: str) -> None:
    """Clear an incomplete dataset folder (left by a crash) so it is rebuilt from scratch."""
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def shard_name(run_id: str, shard: int) -> str:
    return f"part-{shard:05d}-{run_id}.parquet"


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, write) -> None:
    """Write a file; on local disk through a temporary name and a rename, so a crash never
    leaves a partial file under the final name. Object stores (gs://) have no atomic rename and
    write objects whole; there the manifest written last is the only commit marker."""
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    target = posixpath.join(posixpath.dirname(path), f"_tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}") if local else path
    with fs.open(target, "wb") as f:
        write(f)
    if local:
        fs.mv(target, path)


def write_shard(uri: str, name: str, table: pa.Table) -> dict:
    """Write one Parquet shard and return its manifest entry."""
    fs, path = url_to_fs(uri)
    _write_bytes(fs, posixpath.join(path, name), lambda f: pq.write_table(table, f))
    return {"name": name, "rows": table.num_rows}


def list_shards(uri: str, run_id: str) -> list[dict]:
    """Shards a run wrote (by run id), with their row counts from the Parquet footers."""
    fs, path = url_to_fs(uri)
    out = []
    for p in sorted(fs.glob(posixpath.join(path, f"part-*-{run_id}.parquet"))):
        with fs.open(p, "rb") as f:
            out.append({"name": posixpath.basename(p), "rows": pq.ParquetFile(f).metadata.num_rows})
    return out


def write_manifest(
    uri: str,
    *,
    stage: str,
    fp: str,
    config: dict,
    inputs: dict[str, str],
    shards: list[dict],
    code: str,
    counts: dict[str, int] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write ``_manifest.json`` last: the dataset becomes complete (the "done" marker)."""
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "config": config,
        "inputs": inputs,
        "rows": sum(s["rows"] for s in shards),
        "counts": counts or {},
        "shards": shards,
        "schema_version": SCHEMA_VERSION,
        "code_version": code,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        **(extra or {}),
    }
    fs, path = url_to_fs(uri)
    payload = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    _write_bytes(fs, posixpath.join(path, MANIFEST), lambda f: f.write(payload))
    return manifest
