"""Image sets to evaluate: a folder of image files (any fsspec URI) or a complete ``images`` dataset."""

from __future__ import annotations

import posixpath
from typing import Iterator

import torch

from coarse2fine.evaluate.inception import INPUT_SIZE, resize_for_inception
from coarse2fine.preprocess import schema

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def is_dataset(uri: str) -> bool:
    return schema.read_manifest(uri) is not None


def dataset_fingerprint(uri: str) -> str | None:
    """The fingerprint of a complete dataset (the key for cached reference statistics)."""
    m = schema.read_manifest(uri)
    return None if m is None else m["fingerprint"]


def _iter_bytes(uri: str, split: str | None) -> Iterator[bytes]:
    if is_dataset(uri):
        for shard in schema.shard_uris(uri):
            cols = ["image"] + (["split"] if split else [])
            table = schema.read_shard(shard, cols)
            splits = table.column("split").to_pylist() if split else None
            for i, png in enumerate(table.column("image").to_pylist()):
                if split is None or splits[i] == split:
                    yield png
        return
    fs, root = schema.url_to_fs(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"not an image folder or complete images dataset: {uri}")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)
                   and not posixpath.basename(p).startswith("."))
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    for p in files:
        with fs.open(p, "rb") as f:
            yield f.read()




def iter_batches(uri: str, batch_size: int, max_samples: int | None = None, split: str | None = None) -> Iterator[torch.Tensor]:
    """Float batches (N, 3, H, W) in [0, 1]; images of differing sizes are first resized to the
    Inception input size (the same bilinear resize the extractor would apply)."""
    batch: list[torch.Tensor] = []
    seen = 0
    for data in _iter_bytes(uri, split):
        if max_samples is not None and seen >= max_samples:
            break
        batch.append(torch.from_numpy(schema.decode_image(data)))  # (3, H, W) in [0, 1]
        seen += 1
        if len(batch) == batch_size:
            yield _stack(batch)
            batch = []
    if batch:
        yield _stack(batch)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    if len({tuple(t.shape) for t in images}) > 1:
        images = [resize_for_inception(t[None])[0] for t in images]
        assert images[0].shape[-1] == INPUT_SIZE
    return torch.stack(images)
