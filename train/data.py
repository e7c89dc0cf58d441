"""Training data from the ``images`` and ``tokens`` datasets, streamed shard by shard in a
deterministic, resumable order.

Each worker first reads only the small columns of every listed shard (``key``, ``split``) to
index its rows: the rows of the split sorted by key, every ``world``-th from its rank. An epoch
visits this rank's shards in a seeded random order and, inside each shard, its rows in a seeded
random order (MosaicML streaming's shard-then-sample shuffle), so a worker decodes one shard at a
time and its memory stays flat as the dataset grows. The batch of a step is a pure function of
``(seed, rank, step)``: a resumed run continues exactly where its checkpoint left off (no skipped
or repeated batches).

Why the workers read shards themselves rather than through Ray Data's iterator: Ray Data's
streaming split hands blocks to whichever worker asks first and cannot start an epoch at an
arbitrary step, so the batch order would no longer be a function of the step and resume would
not be exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from coarse2fine.preprocess import schema
from coarse2fine.preprocess.errors import UserValueError

INDEX_READERS = 16
"""Shards whose small columns are read at once while indexing: 20,000 shards at ~0.1 s per object
store request are half an hour one by one (``infra/README.md``), two minutes 16 at a time."""

Decode = Callable[[pa.Table], dict[str, torch.Tensor]]
"""Rows of one shard (a table) → tensors whose first dimension is the row."""


@dataclass(frozen=True)
class RankRows:
    """Where this rank's rows live, in key order: row ``i`` is row ``row[i]`` of ``shards[shard[i]]``."""

    shards: tuple[str, ...]
    shard: np.ndarray  # (n,) int64
    row: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.shard)


def _small_columns(uris: list[str], columns: list[str]) -> list[pa.Table]:
    """``columns`` of every shard in ``uris``, ``INDEX_READERS`` shards at a time (object stores:
    one request's latency each, overlapped)."""
    with ThreadPoolExecutor(INDEX_READERS) as pool:
        return list(pool.map(lambda u: schema.read_shard(u, columns), uris))


def rank_rows(uri: str, split: str | None, rank: int, world: int) -> RankRows:
    """Index this rank's rows of a complete dataset (of one ``split``, or all): the rows sorted by
    key, every ``world``-th from ``rank``; reads only the ``key`` and ``split`` columns."""
    uris = schema.shard_uris(uri)
    keys, shard, row = [], [], []
    for s, t in enumerate(_small_columns(uris, ["key"] + (["split"] if split else []))):
        rows = np.arange(t.num_rows) if split is None else \
            np.flatnonzero(np.asarray(t.column("split").to_pylist(), dtype=object) == split)
        keys.append(np.asarray(t.column("key").to_pylist(), dtype=object)[rows])
        shard.append(np.full(len(rows), s))
        row.append(rows)
    order = np.argsort(np.concatenate(keys or [np.empty(0, object)]), kind="stable")[rank::world]
    if not len(order):
        raise ValueError(f"rank {rank} of {world} has no {split or ''} rows in {uri}")
    return RankRows(tuple(uris), np.concatenate(shard)[order], np.concatenate(row)[order])


class ShardStream:
    """This rank's rows of a dataset, read (``columns``) and decoded (``decode``) one shard at a
    time; the decoded rows of the last ``keep`` shards are kept, so memory is a few shards'
    worth whatever the dataset's size. ``batch(step, batch_size)`` is a pure function of
    ``(seed, rank, step)``; while the caller computes, a background thread reads and decodes
    the next shard the coming steps need (one at a time, as a DataLoader's prefetching worker
    would), so a GPU-bound step hides the decoding."""

    def __init__(self, rows: RankRows, columns: list[str], decode: Decode, seed: int = 0, rank: int = 0,
                 keep: int = 2) -> None:
        self.rows, self.columns, self.decode, self.seed, self.rank, self.keep = rows, columns, decode, seed, rank, keep
        by_shard = np.argsort(rows.shard, kind="stable")  # rank rows grouped by shard, ascending within each
        present, starts = np.unique(rows.shard[by_shard], return_index=True)
        self.members = dict(zip(present.tolist(), np.split(by_shard, starts[1:])))  # shard -> its rank rows
        self._largest = max(map(len, self.members.values()))  # rows of the largest shard, for the look-ahead
        self._decoded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._prefetcher = ThreadPoolExecutor(1)
        self._pending: dict[int, Future] = {}  # shard -> its decoded rows, being read in the background
        self.shards_read = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def rows_held(self) -> int:
        """Decoded rows in memory now (kept, and prefetched)."""
        ready = [f.result() for f in self._pending.values() if f.done()]
        return sum(len(next(iter(d.values()))) for d in [*self._decoded.values(), *ready])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices in the order epoch ``epoch`` visits them: shards in a seeded
        random order, and the rows of each shard in a seeded random order."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, epoch)) & 0x7FFFFFFF)
            shards = list(self.members)
            self._orders[epoch] = np.concatenate([
                self.members[shards[i]][torch.randperm(len(self.members[shards[i]]), generator=g).numpy()]
                for i in torch.randperm(len(shards), generator=g).tolist()])
            while len(self._orders) > 3:  # the epochs a batch and the look-ahead span (more are recomputed)
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        """Row indices of step ``step``'s batch."""
        return self._positions(step * batch_size, batch_size)

    def _positions(self, start: int, count: int) -> np.ndarray:
        """Row indices at positions ``start …`` of the endless sequence of epoch orders."""
        out: list[np.ndarray] = []
        taken = 0
        while taken < count:
            epoch, offset = divmod(start + taken, len(self))
            out.append(self.epoch_order(epoch)[offset: offset + count - taken])
            taken += len(out[-1])
        return np.concatenate(out)

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        out = self.take(self.indices(step, batch_size))
        if not self._pending:  # one shard at a time: the first one the coming steps need and nobody holds
            ahead = -(-self._largest // batch_size) + 1  # steps that span the largest shard
            coming = self._positions((step + 1) * batch_size, ahead * batch_size)  # the next `ahead` batches
            s = next((s for s in dict.fromkeys(self.rows.shard[coming].tolist()) if s not in self._decoded), None)
            if s is not None:
                self._pending[s] = self._prefetcher.submit(self._read, s)
        return out

    def take(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The decoded rows ``idx`` (this rank's row indices), in that order."""
        parts, positions = [], []
        shard_of = self.rows.shard[idx]
        for s in dict.fromkeys(shard_of.tolist()):  # shards in order of first use
            at = np.flatnonzero(shard_of == s)
            local = np.searchsorted(self.members[s], idx[at])  # position among the shard's rank rows
            decoded = self._shard(s)
            parts.append({k: v[torch.from_numpy(local)] for k, v in decoded.items()})
            positions.append(at)
        back = torch.from_numpy(np.argsort(np.concatenate(positions)))  # back to the order of idx
        return {k: torch.cat([p[k] for p in parts])[back] for k in parts[0]}

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        """The decoded rank rows of shard ``s`` (in the order of ``members[s]``), read at most
        once while kept."""
        if s in self._decoded:
            self._decoded.move_to_end(s)
        else:
            pending = self._pending.pop(s, None)
            self._decoded[s] = pending.result() if pending else self._read(s)
            self.shards_read += 1
            while len(self._decoded) > self.keep:
                self._decoded.popitem(last=False)
        return self._decoded[s]

    def _read(self, s: int) -> dict[str, torch.Tensor]:
        t = schema.read_shard(self.rows.shards[s], self.columns).take(pa.array(self.rows.row[self.members[s]]))
        return self.decode(t)


def decode_images(t: pa.Table) -> dict[str, torch.Tensor]:
    """An ``images`` table → ``image`` float (n, 3, H, W) in [0, 1]."""
    return {"image": torch.from_numpy(np.stack([schema.decode_image(b) for b in t.column("image").to_pylist()]))}


def decode_tokens(t: pa.Table, layout: list[schema.TokenColumn], null_class: int) -> dict[str, torch.Tensor]:
    """A ``tokens`` table → ``tokens`` (n, L): the layout's columns flattened and concatenated in
    order, int64 ids or float32 latents; and ``label`` (n,), a missing label becoming the null class."""
    dtype = np.int64 if all(c.dtype == "int32" for c in layout) else np.float32
    seqs = np.concatenate([schema.tensor_numpy(t.column(c.name)).reshape(t.num_rows, -1) for c in layout],
                          axis=1).astype(dtype)  # (n, L)
    labels = [null_class if lab is None or lab < 0 else lab for lab in t.column("label").to_pylist()]
    return {"tokens": torch.from_numpy(seqs), "label": torch.tensor(labels, dtype=torch.int64)}


def load_split(images_uri: str, split: str, rank: int = 0, world: int = 1, limit: int | None = None) -> torch.Tensor:
    """Images of one split of a complete ``images`` dataset, for one rank (no Ray needed); the
    rank's first ``limit`` by key when given. Reads only the shards that hold them."""
    stream = ShardStream(rank_rows(images_uri, split, rank, world), ["image"], decode_images, keep=1)
    return stream.take(np.arange(len(stream) if limit is None else min(limit, len(stream))))["image"]


def bases_from_decomposition(cols: dict[str, np.ndarray], order: int, k: int) -> np.ndarray:
    """The Mumford–Shah bases B_1 … B_k (N, k, 3, H, W) float32 from the ``base`` (B_n) and
    ``detail_j`` arrays (N, 3, H, W) of a decomposition of order n ≥ k (CART seed eq. 10:
    B_{j−1} = B_j + D_j)."""
    assert k <= order, f"an order-{order} decomposition cannot give {k} bases"
    b = cols["base"].astype(np.float32)  # B_n
    bases = {order: b}
    for j in range(order, 1, -1):
        b = b + cols[f"detail_{j}"].astype(np.float32)
        bases[j - 1] = b
    return np.stack([bases[i] for i in range(1, k + 1)], axis=1) if k else np.zeros((len(b), 0, *b.shape[1:]), np.float32)


def decomposition_columns(uri: str) -> tuple[int, list[str]]:
    """The order of the ``decomposition`` dataset at ``uri`` and the array columns
    :func:`bases_from_decomposition` needs from it."""
    n = schema.read_manifest(uri)["config"]["order"]
    return n, ["base"] + [f"detail_{j}" for j in range(2, n + 1)]


def check_decomposition(images_uri: str, decomposition_uri: str, k: int) -> None:
    """One-line :class:`UserValueError` unless the ``decomposition`` dataset has order ≥ ``k`` and
    a row for every key of the ``images`` dataset."""
    manifest = schema.read_manifest(decomposition_uri)
    if manifest is None:
        raise schema.IncompleteDatasetError(f"{decomposition_uri} is incomplete: run `c2f preprocess` first")
    order = manifest["config"]["order"]
    if order < k:
        raise UserValueError(f"the tokenizer needs {k} Mumford–Shah bases but {decomposition_uri} has order {order}: "
                             f"set preprocess.decomposition.order >= {k} (an order-n dataset serves orders 0…n)")
    keys = set(schema.read_table(images_uri, ["key"]).column("key").to_pylist())
    have = set(schema.read_table(decomposition_uri, ["key"]).column("key").to_pylist())
    if missing := sorted(keys - have):
        raise UserValueError(f"decomposition dataset {decomposition_uri} has no row for {len(missing)} of the "
                             f"{len(keys)} images of {images_uri} (e.g. key {missing[0][:12]}…): it was built from "
                             f"other images; re-run `c2f preprocess`")


class Bases:
    """B_1 … B_k by key from a ``decomposition`` dataset: the ``images`` ⋈ ``decomposition`` join.
    Indexes the keys once (the ``key`` column of every shard), then reads only the shards that
    hold the asked keys, one at a time, keeping the asked rows: memory is one shard's worth."""

    def __init__(self, decomposition_uri: str, k: int) -> None:
        self.uri, self.k = decomposition_uri, k
        self.order, self.columns = decomposition_columns(decomposition_uri)
        self.shards = schema.shard_uris(decomposition_uri)
        self.where = {key: (s, r) for s, t in enumerate(_small_columns(self.shards, ["key"]))
                      for r, key in enumerate(t.column("key").to_pylist())}

    def __call__(self, keys: list[str]) -> torch.Tensor:
        """(N, k, 3, H, W) float32, in the order of ``keys``."""
        if missing := [key for key in keys if key not in self.where]:
            raise UserValueError(f"decomposition dataset {self.uri} has no row for {len(missing)} of "
                                 f"{len(keys)} images (e.g. key {missing[0][:12]}…): re-run `c2f preprocess`")
        by_shard: dict[int, list[int]] = {}  # shard -> positions in keys
        for i, key in enumerate(keys):
            by_shard.setdefault(self.where[key][0], []).append(i)
        parts, positions = [], []
        for s, at in by_shard.items():
            t = schema.read_shard(self.shards[s], self.columns).take(pa.array([self.where[keys[i]][1] for i in at]))
            parts.append(bases_from_decomposition({c: schema.tensor_numpy(t.column(c)) for c in self.columns},
                                                  self.order, self.k))
            positions.extend(at)
        return torch.from_numpy(np.concatenate(parts)[np.argsort(positions)])


def load_bases(decomposition_uri: str, keys: list[str], k: int) -> torch.Tensor:
    """B_1 … B_k of the images ``keys`` (in that order), (N, k, 3, H, W)."""
    return Bases(decomposition_uri, k)(keys)
