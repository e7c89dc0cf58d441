"""Token shards: the row function a Beam job maps to turn images into a method's token columns.

``token_rows(checkpoint_uri)`` returns the ``make_rows`` callable for
``preprocess.beam_jobs.run_image_stage``: on each Beam worker it loads the tokenizer once (cached
per process) and encodes one output shard in batches with its method's ``encode``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from coarse2fine.preprocess import schema
from coarse2fine.train import data
from coarse2fine.train.checkpoints import load_model

BATCH = 64  # images encoded at once on a Beam worker (CPU memory, not a model constant)


@functools.lru_cache(maxsize=2)
def _tokenizer(checkpoint_uri: str):
    return load_model(checkpoint_uri, "cpu", "tokenizer")


@torch.no_grad()
def encode_rows(checkpoint_uri: str, items: list[tuple[str, dict]]) -> list[dict]:
    """``[(key, {"image", "label", "split"[, "decomposition"]})]`` → rows of the method's tokens
    schema (``decomposition``: the joined row's arrays and order, for a method that takes bases)."""
    method, model = _tokenizer(checkpoint_uri)
    k = method.factors(model.cfg)
    rows = []
    for start in range(0, len(items), BATCH):
        chunk = items[start: start + BATCH]
        x = torch.from_numpy(np.stack([schema.decode_image(r["image"]) for _, r in chunk]))
        bases = None
        if k:  # the joined decomposition columns: float32 bytes of (3, H, W) arrays
            order = chunk[0][1]["decomposition"]["order"]
            names = [c for c in chunk[0][1]["decomposition"] if c != "order"]
            cols = {c: np.stack([np.frombuffer(r["decomposition"][c], np.float32) for _, r in chunk]
                                ).reshape(x.shape) for c in names}
            bases = torch.from_numpy(data.bases_from_decomposition(cols, order, k))
        columns = method.encode(model, x, bases)  # name -> (B, *shape)
        for i, (key, r) in enumerate(chunk):
            rows.append({"key": key, "label": r["label"], "split": r["split"],
                         **{name: a[i] for name, a in columns.items()}})
    return rows


def token_rows(checkpoint_uri: str):
    return functools.partial(encode_rows, checkpoint_uri)
