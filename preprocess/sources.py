"""The reader side of ingest: list the inputs under ``data.source`` (image files, or Parquet files
with an image-bytes column) and read one input (img2dataset's reader)."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from coarse2fine.preprocess import schema
from coarse2fine.preprocess.config import DataConfig
from coarse2fine.preprocess.errors import UserKeyError, UserValueError

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class SourceListing:
    """Inputs found under ``data.source``: image files, or Parquet files with row counts."""

    kind: str  # "files" | "parquet"
    entries: list[tuple[str, int]]  # (uri, size in bytes) or (parquet uri, rows)
    labels: dict[str, int | None]  # file uri -> label (files only)
    classes: list[str]  # folder names, or a Parquet label column's strings (sorted; label = index)
    skipped: int = 0  # hidden (dot-prefixed) names, not read

    @property
    def num_inputs(self) -> int:
        return len(self.entries) if self.kind == "files" else sum(n for _, n in self.entries)

    def signature(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.entries]).encode()).hexdigest()[:16]


# Side files of Parquet writers and of our own datasets: never inputs.
SIDECARS = frozenset({"_SUCCESS", "_metadata", "_common_metadata", "_manifest.json", "_listing.parquet"})


def list_source(data: DataConfig) -> SourceListing:
    """List the inputs under ``data.source``. Hidden (dot-prefixed) files and folders are skipped
    and counted (``skipped``); ``_``-prefixed names are read (camera files like ``_DSC0001.png``),
    except the side files of Parquet writers and datasets (:data:`SIDECARS`)."""
    fs, root = schema.url_to_fs(data.source)
    if not fs.exists(root):
        raise FileNotFoundError(f"data.source does not exist: {data.source}")
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}

    def unstrip(p: str) -> str:
        return p if proto in ("file", "local") else f"{proto}://{p}"

    files, skipped = [], 0
    for p, info in sorted(found.items()):
        rel = posixpath.relpath(p, root) if p != root else posixpath.basename(p)
        if any(part.startswith(".") for part in rel.split("/")):
            skipped += 1
            continue
        if posixpath.basename(rel) in SIDECARS:
            continue
        files.append((unstrip(p), rel, int(info.get("size") or 0)))
    if skipped:
        log.info("listing: %d hidden (dot-prefixed) files skipped under %s", skipped, data.source)
    if files and all(uri.endswith(PARQUET_SUFFIXES) for uri, _, _ in files):
        return _list_parquet(fs, [uri for uri, _, _ in files], data, skipped)
    labels: dict[str, int | None] = {}
    classes: list[str] = []
    if data.label_from == "folder":
        classes = sorted({rel.split("/")[0] for _, rel, _ in files if "/" in rel})
    index = {c: i for i, c in enumerate(classes)}
    for uri, rel, _ in files:
        labels[uri] = index[rel.split("/")[0]] if "/" in rel and classes else None
    return SourceListing("files", [(uri, size) for uri, _, size in files], labels, classes, skipped)


def _label_column(data: DataConfig) -> str | None:
    return None if data.label_from in ("none", "folder") else data.label_from


def _list_parquet(fs, uris: list[str], data: DataConfig, skipped: int) -> SourceListing:
    """Row counts of Parquet inputs, their column types checked up front (one line on a wrong
    type), and the class names of a string label column."""
    entries, names = [], set()
    label_col = _label_column(data)
    for uri in uris:
        with fs.open(schema.url_to_fs(uri)[1], "rb") as f:
            pf = pq.ParquetFile(f)
            sch = pf.schema_arrow
            missing = [c for c in [data.image_column] + ([label_col] if label_col else []) if c not in sch.names]
            if missing:
                raise UserKeyError(f"{uri} has no column(s) {missing}; columns are {sch.names}")
            typ = sch.field(data.image_column).type
            if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
                raise UserValueError(f"{uri}: column {data.image_column!r} (data.image_column) holds {typ}, not "
                                     f"image bytes (binary)")
            if label_col:
                ltyp = sch.field(label_col).type
                if pa.types.is_string(ltyp) or pa.types.is_large_string(ltyp):
                    names |= {v for v in pf.read(columns=[label_col]).column(0).to_pylist() if v is not None}
                elif not pa.types.is_integer(ltyp):
                    raise UserValueError(f"{uri}: label column {label_col!r} holds {ltyp}; labels are integers "
                                         f"or class names (strings)")
            entries.append((uri, pf.metadata.num_rows))
    return SourceListing("parquet", entries, {}, sorted(names), skipped)


def read_file(uri: str) -> bytes:
    """The bytes of a listed input. The URI is split at its protocol only, never parsed as a
    chained fsspec URL, so any legal file name (``a::b.png``) opens."""
    proto, sep, path = uri.partition("://")
    fs = fsspec.filesystem(proto) if sep else fsspec.filesystem("file")
    with fs.open(path if sep else uri, "rb") as f:
        return f.read()


def parquet_rows(uri: str, data: DataConfig, classes: list[str]) -> Iterator[tuple[str, int | None, bytes | None, bool]]:
    """Rows of a Parquet input as ``(source_uri, label, image bytes or None for a null cell, False)``
    (the last item says whether the payload still has to be read from a file); a string label is
    its index in ``classes``. Column types were checked when listing."""
    fs, path = schema.url_to_fs(uri)
    label_col = _label_column(data)
    index = {c: i for i, c in enumerate(classes)}
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [data.image_column] + ([label_col] if label_col else [])
        i = 0
        for batch in pf.iter_batches(columns=cols, batch_size=256):
            imgs = batch.column(0).to_pylist()
            labs = batch.column(1).to_pylist() if label_col else [None] * len(imgs)
            for img, lab in zip(imgs, labs):
                label = None if lab is None else index[lab] if isinstance(lab, str) else int(lab)
                yield f"{uri}#row={i}", label, img, False
                i += 1
