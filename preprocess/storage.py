"""Writing datasets on fsspec storage: fingerprints, shards, and the manifest written last.

A dataset lives at ``{root}/{stage}/{fingerprint}/`` and is complete only once its
``_manifest.json`` exists. Readers take only the shards the manifest lists, so a crashed writer
never leaves anything readable.

Several runs may build one dataset at once; how they publish it is ``commit_protocol.py``.
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
from coarse2fine.preprocess.errors import UserError
from coarse2fine.preprocess.schema import MANIFEST, SCHEMA_VERSION, join, url_to_fs

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


def check_writable(root: str) -> None:
    """Write and delete a probe file under ``root``, so that a root that cannot be used fails in
    one line before any work (:class:`UserError` naming the root and the cause: not writable,
    missing bucket, no credentials, unreachable). A missing local folder is created; a missing
    bucket is not."""
    probe = join(root, f".c2f-probe-{uuid.uuid4().hex}")
    try:
        fs, path = url_to_fs(probe)
        _reach(getattr(fs, "_location", None))
        if "file" in fs.protocol:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"probe")
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - every cause becomes one line (the traceback stays chained)
        raise UserError(f"storage.root {root} cannot be used: {_storage_cause(e, root)}") from e


REACH_TIMEOUT_S = 5
"""Seconds to open a connection to an object store's endpoint (its client would retry for about a minute)."""


def _reach(endpoint: str | None) -> None:
    """Open (and close) a TCP connection to ``endpoint`` (an object store's base URL; None = a local
    filesystem): an unreachable store fails in seconds."""
    if not endpoint:
        return
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = url.port or (443 if url.scheme == "https" else 80)
    socket.create_connection((url.hostname, port), timeout=REACH_TIMEOUT_S).close()


def _storage_cause(e: Exception, root: str) -> str:
    """The reason of a failed probe, in words."""
    name = type(e).__name__
    code = getattr(e, "code", None)
    if name in ("DefaultCredentialsError", "RefreshError", "TransportError") or code == 401:
        return (f"no usable cloud credentials ({name}); set GOOGLE_APPLICATION_CREDENTIALS or run "
                "`gcloud auth application-default login`")
    if isinstance(e, PermissionError) or code == 403:
        return f"permission denied ({str(e).splitlines()[0] if str(e) else name})"
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return f"a part of the path is a file, not a folder ({e})"
    if isinstance(e, FileNotFoundError) or code == 404:
        bucket = root.split("://", 1)[1].split("/", 1)[0] if "://" in root else None
        return f"bucket {bucket} does not exist" if bucket else f"a parent folder does not exist ({e})"
    if isinstance(e, (OSError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return f"cannot reach the storage ({name}: {str(e).splitlines()[0] if str(e) else 'no answer'})"
    return f"{name}: {str(e).splitlines()[0] if str(e) else ''}"


def dataset_uri(root: str, stage: str, fp: str) -> str:
    return join(root, stage, fp)


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def shard_name(run_id: str, shard: int) -> str:
    return f"part-{shard:05d}-{run_id}.parquet"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, write) -> None:
    """Write a file; on local disk through a temporary name and a rename, so a crash never
    leaves a partial file under the final name. Object stores (gs://) have no atomic rename and
    write objects whole; there the manifest written last is the only commit marker."""
    local = is_local(fs)
    target = posixpath.join(posixpath.dirname(path), f"_tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}") if local else path
    with fs.open(target, "wb") as f:
        write(f)
    if local:
        fs.mv(target, path)


def write_shard(uri: str, name: str, table: pa.Table) -> dict:
    """Write one Parquet shard and return its manifest entry."""
    fs, path = url_to_fs(uri)
    write_atomic(fs, posixpath.join(path, name), lambda f: pq.write_table(table, f))
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
    write_atomic(fs, posixpath.join(path, MANIFEST), lambda f: f.write(payload))
    return manifest
