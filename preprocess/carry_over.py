"""Incremental ingest: find the latest complete ingest of an append-only source and carry its
shards over, so a new ingest reads only inputs it has not seen (the listing of every input an
ingest saw is kept beside its shards in ``_listing.parquet``)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import pyarrow as pa

from coarse2fine.preprocess import schema, storage
from coarse2fine.preprocess.config import StorageConfig
from coarse2fine.preprocess.sources import SourceListing

LISTING_FILE = "_listing.parquet"  # every (input uri, size) an ingest saw, written before its manifest


@dataclass(frozen=True)
class PreviousIngest:
    """A complete earlier ingest whose rows a new ingest carries over (only new inputs are read)."""

    images_uri: str
    rejected_uri: str
    manifest: dict
    seen: frozenset[tuple[str, int]]


def write_listing(images_uri: str, listing: SourceListing) -> None:
    table = pa.table({"uri": [u for u, _ in listing.entries], "size": [n for _, n in listing.entries]})
    storage.write_shard(images_uri, LISTING_FILE, table)


def previous_ingest(store: StorageConfig, config: dict, listing: SourceListing, code: str) -> PreviousIngest | None:
    """The latest complete ingest with the same data config, code and classes whose inputs are all
    still listed unchanged (an append-only source, e.g. nightly uploads); None when there is none."""
    fs, root = schema.url_to_fs(schema.join(store.root, "images"))
    same = json.loads(json.dumps({k: v for k, v in config.items() if k != "listing"}, default=str))
    entries = {(u, n) for u, n in listing.entries}
    best = None
    for path in fs.glob(posixpath.join(root, "*", schema.MANIFEST)):
        uri = schema.join(store.root, "images", posixpath.basename(posixpath.dirname(path)))
        m = schema.read_manifest(uri)
        old = {k: v for k, v in m["config"].items() if k != "listing"}
        if old != same or m["code_version"] != code or m.get("classes") != listing.classes:
            continue
        if not fs.exists(posixpath.join(posixpath.dirname(path), LISTING_FILE)):
            continue
        t = schema.read_shard(schema.join(uri, LISTING_FILE))
        seen = frozenset(zip(t.column("uri").to_pylist(), t.column("size").to_pylist()))
        rejected_uri = schema.join(store.root, "rejected", m["fingerprint"])
        if seen <= entries and schema.read_manifest(rejected_uri) and (best is None or m["created"] > best.manifest["created"]):
            best = PreviousIngest(uri, rejected_uri, m, seen)
    return best


def carry_shards(old_uri: str, new_uri: str, manifest: dict) -> list[dict]:
    """Copy a complete dataset's listed shards into a new dataset folder; their manifest entries."""
    fs, old = schema.url_to_fs(old_uri)
    _, new = schema.url_to_fs(new_uri)
    for shard in manifest["shards"]:
        fs.copy(posixpath.join(old, shard["name"]), posixpath.join(new, shard["name"]))
    return manifest["shards"]
