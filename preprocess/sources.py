"""The reader side of ingest: list the inputs under ``data.source`` (image files, or Parquet files
with an image-bytes column) and read one input (img2dataset's reader)."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from coarse2fine.preprocess import storage
from coarse2fine.preprocess.config import DataConfig
from coarse2fine.preprocess.errors import UserKeyError

PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class SourceListing:
    """Inputs found under ``data.source``: image files, or Parquet files with row counts."""

    kind: str  # "files" | "parquet"
    entries: list[tuple[str, int]]  # (uri, size in bytes) or (parquet uri, rows)
    labels: dict[str, int | None]  # file uri -> label (files only)
    classes: list[str]

    @property
    def num_inputs(self) -> int:
        return len(self.entries) if self.kind == "files" else sum(n for _, n in self.entries)

    def signature(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.entries]).encode()).hexdigest()[:16]


def list_source(data: DataConfig) -> SourceListing:
    """List the inputs under ``data.source`` (hidden and ``_``-prefixed names are skipped)."""
    fs, root = storage.url_to_fs(data.source)
    if not fs.exists(root):
        raise FileNotFoundError(f"data.source does not exist: {data.source}")
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}

    def unstrip(p: str) -> str:
        return p if proto in ("file", "local") else f"{proto}://{p}"

    files = []
    for p, info in sorted(found.items()):
        rel = posixpath.relpath(p, root) if p != root else posixpath.basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        files.append((unstrip(p), rel, int(info.get("size") or 0)))
    if files and all(uri.endswith(PARQUET_SUFFIXES) for uri, _, _ in files):
        entries = []
        for uri, _, _ in files:
            with fs.open(storage.url_to_fs(uri)[1], "rb") as f:
                entries.append((uri, pq.ParquetFile(f).metadata.num_rows))
        return SourceListing("parquet", entries, {}, [])
    labels: dict[str, int | None] = {}
    classes: list[str] = []
    if data.label_from == "folder":
        classes = sorted({rel.split("/")[0] for _, rel, _ in files if "/" in rel})
    index = {c: i for i, c in enumerate(classes)}
    for uri, rel, _ in files:
        labels[uri] = index[rel.split("/")[0]] if "/" in rel and classes else None
    return SourceListing("files", [(uri, size) for uri, _, size in files], labels, classes)


def read_file(uri: str) -> bytes:
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def parquet_rows(uri: str, data: DataConfig) -> Iterator[tuple[str, int | None, bytes]]:
    """Rows of a Parquet input as ``(source_uri, label, image bytes)``."""
    fs, path = storage.url_to_fs(uri)
    label_col = None if data.label_from in ("none", "folder") else data.label_from
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [data.image_column] + ([label_col] if label_col else [])
        missing = [c for c in cols if c not in pf.schema_arrow.names]
        if missing:
            raise UserKeyError(f"{uri} has no column(s) {missing}; columns are {pf.schema_arrow.names}")
        i = 0
        for batch in pf.iter_batches(columns=cols, batch_size=256):
            imgs = batch.column(0).to_pylist()
            labs = batch.column(1).to_pylist() if label_col else [None] * len(imgs)
            for img, lab in zip(imgs, labs):
                yield f"{uri}#row={i}", (None if lab is None else int(lab)), img or b""
                i += 1
