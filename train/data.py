"""Training data from the ``images`` and ``tokens`` datasets, with a deterministic, resumable batch order.

Every worker reads the dataset's listed shards (through Ray Data when run under Ray Train), keeps
the rows of its split sorted by key, takes every ``world``-th one from its rank, and draws batches
from seeded per-epoch permutations. The batch of a step is a pure function of
``(seed, rank, step)``, so a resumed run continues exactly where the checkpoint left off (no
skipped or repeated batches). Rows are held decoded in memory: fine for demo-scale datasets; large
datasets need a streaming loader (noted in the README).
"""

from __future__ import annotations

import numpy as np
import torch

from coarse2fine.preprocess import schema
from coarse2fine.preprocess.errors import UserValueError


def rank_order(keys: list[str], rank: int, world: int) -> list[int]:
    """Indices of this rank's rows: sorted by key, every ``world``-th from ``rank``."""
    order = sorted(range(len(keys)), key=keys.__getitem__)[rank::world]
    if not order:
        raise ValueError(f"rank {rank} of {world} has no training rows")
    return order


def decode_rows(keys: list[str], images: list[bytes], rank: int, world: int) -> torch.Tensor:
    """Sort by key, keep this rank's rows, decode to float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack([schema.decode_image(images[i]) for i in rank_order(keys, rank, world)]))


def token_rows(rows: dict[str, list], layout: list[schema.TokenColumn], null_class: int, rank: int, world: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a ``tokens`` dataset → this rank's sequences (n, L) — the layout's columns
    flattened and concatenated in order; int64 ids, or float32 latents — and labels (n,); a
    missing label becomes the null class."""
    order = rank_order(rows["key"], rank, world)
    dtype = np.int64 if all(c.dtype == "int32" for c in layout) else np.float32
    seqs = np.stack([np.concatenate([np.asarray(rows[c.name][i]).ravel() for c in layout])
                     for i in order]).astype(dtype)  # (n, L)
    labels = [rows["label"][i] for i in order]
    labels = [null_class if lab is None or lab != lab or lab < 0 else int(lab) for lab in labels]
    return torch.from_numpy(seqs), torch.tensor(labels)


def load_split(images_uri: str, split: str, rank: int = 0, world: int = 1, limit: int | None = None) -> torch.Tensor:
    """Images of one split of a complete ``images`` dataset, for one rank (no Ray needed); the
    first ``limit`` by key when given."""
    t = schema.read_table(images_uri, ["key", "split", "image"])
    mask = [s == split for s in t.column("split").to_pylist()]
    t = t.filter(mask).sort_by("key").slice(0, limit)
    return decode_rows(t.column("key").to_pylist(), t.column("image").to_pylist(), rank, world)


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int) -> torch.Tensor:
    """Indices of step ``step``'s batch: consecutive slices of per-epoch permutations of ``range(n)``."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(hash((seed, rank, epoch)) & 0x7FFFFFFF)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


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


def load_bases(decomposition_uri: str, keys: list[str], k: int) -> torch.Tensor:
    """B_1 … B_k of the images ``keys`` (in that order), (N, k, 3, H, W): the ``images`` ⋈
    ``decomposition`` join by key."""
    order, columns = decomposition_columns(decomposition_uri)
    t = schema.read_table(decomposition_uri, ["key"] + columns)
    row = {key: i for i, key in enumerate(t.column("key").to_pylist())}
    if missing := [key for key in keys if key not in row]:
        raise UserValueError(f"decomposition dataset {decomposition_uri} has no row for {len(missing)} of "
                             f"{len(keys)} images (e.g. key {missing[0][:12]}…): re-run `c2f preprocess`")
    t = t.take([row[key] for key in keys])
    return torch.from_numpy(bases_from_decomposition({c: schema.tensor_numpy(t.column(c)) for c in columns}, order, k))
