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


def decode_rows(keys: list[str], images: list[bytes], rank: int, world: int) -> torch.Tensor:
    """Sort by key, keep this rank's rows, decode to float (N, 3, H, W) in [0, 1]."""
    order = sorted(range(len(keys)), key=keys.__getitem__)[rank::world]
    if not order:
        raise ValueError(f"rank {rank} of {world} has no training images")
    return torch.from_numpy(np.stack([schema.decode_image(images[i]) for i in order]))


def token_rows(rows: dict[str, list], layout: list[schema.TokenColumn], null_class: int, rank: int, world: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a ``tokens`` dataset → this rank's sequences (n, L) — the layout's columns
    flattened and concatenated in order; int64 ids, or float32 latents — and labels (n,); a
    missing label becomes the null class."""
    order = sorted(range(len(rows["key"])), key=rows["key"].__getitem__)[rank::world]
    if not order:
        raise ValueError(f"rank {rank} of {world} has no token sequences")
    dtype = np.int64 if all(c.dtype == "int32" for c in layout) else np.float32
    seqs = np.stack([np.concatenate([np.asarray(rows[c.name][i]).ravel() for c in layout])
                     for i in order]).astype(dtype)  # (n, L)
    labels = [rows["label"][i] for i in order]
    labels = [null_class if lab is None or lab != lab or lab < 0 else int(lab) for lab in labels]
    return torch.from_numpy(seqs), torch.tensor(labels)


def load_split(images_uri: str, split: str, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Images of one split of a complete ``images`` dataset, for one rank (no Ray needed)."""
    t = schema.read_table(images_uri, ["key", "split", "image"])
    mask = [s == split for s in t.column("split").to_pylist()]
    t = t.filter(mask)
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
