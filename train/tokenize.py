"""Token shards: the row function a Beam job maps to turn images into discrete ids per scale.

``token_rows(checkpoint_uri)`` returns the ``make_rows`` callable for
``preprocess.beam_jobs.run_image_stage``: on each Beam worker it loads the tokenizer once (cached
per process) and encodes one output shard in batches.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from coarse2fine.preprocess import schema
from coarse2fine.train.models.io import load_tokenizer

BATCH = 64


@functools.lru_cache(maxsize=2)
def _tokenizer(checkpoint_uri: str):
    return load_tokenizer(checkpoint_uri, "cpu")


@torch.no_grad()
def encode_rows(checkpoint_uri: str, items: list[tuple[str, dict]]) -> list[dict]:
    """``[(key, {"image", "label", "split"})]`` → rows of :func:`preprocess.schema.tokens_schema`."""
    model = _tokenizer(checkpoint_uri)
    g = model.cfg.grid
    rows = []
    for start in range(0, len(items), BATCH):
        chunk = items[start: start + BATCH]
        x = torch.from_numpy(np.stack([schema.decode_image(r["image"]) for _, r in chunk]))
        _, idx, _ = model.encode(x)  # (B, S, N)
        ids = idx.to(torch.int32).reshape(len(chunk), idx.shape[1], g, g).numpy()  # (B, S, g, g)
        for (key, r), per_scale in zip(chunk, ids):
            rows.append({"key": key, "label": r["label"], "split": r["split"],
                         **{f"ids_{s}": a for s, a in enumerate(per_scale)}})
    return rows


def token_rows(checkpoint_uri: str):
    return functools.partial(encode_rows, checkpoint_uri)
