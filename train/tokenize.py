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
from coarse2fine.train.checkpoints import load_model

BATCH = 64  # images encoded at once on a Beam worker (CPU memory, not a model constant)


@functools.lru_cache(maxsize=2)
def _tokenizer(checkpoint_uri: str):
    return load_model(checkpoint_uri, "cpu", "tokenizer")


@torch.no_grad()
def encode_rows(checkpoint_uri: str, items: list[tuple[str, dict]]) -> list[dict]:
    """``[(key, {"image", "label", "split"})]`` → rows of the method's tokens schema."""
    method, model = _tokenizer(checkpoint_uri)
    rows = []
    for start in range(0, len(items), BATCH):
        chunk = items[start: start + BATCH]
        x = torch.from_numpy(np.stack([schema.decode_image(r["image"]) for _, r in chunk]))
        columns = method.encode(model, x)  # name -> (B, *shape)
        for i, (key, r) in enumerate(chunk):
            rows.append({"key": key, "label": r["label"], "split": r["split"],
                         **{name: a[i] for name, a in columns.items()}})
    return rows


def token_rows(checkpoint_uri: str):
    return functools.partial(encode_rows, checkpoint_uri)
