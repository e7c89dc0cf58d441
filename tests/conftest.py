"""Shared fixtures: tiny demo folders and configs for real Beam runs on this 2-core machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from coarse2fine.preprocess.config import DataConfig, DecompositionConfig, PreprocessConfig, StorageConfig
from coarse2fine.preprocess.demo_data import demo_crops

TINY_RES = 32


def write_demo(folder: Path, n: int, resolution: int = TINY_RES, seed: int = 0) -> Path:
    for i, (name, crop) in enumerate(demo_crops(n, resolution, seed)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        crop.save(folder / name / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """12 real-photo crops at 32x32 in per-class sub-folders (read-only for tests)."""
    return write_demo(tmp_path_factory.mktemp("demo"), 12)


def tiny_configs(source: str, root: str, **pre) -> tuple[DataConfig, PreprocessConfig, StorageConfig]:
    data = DataConfig(source=source, resolution=TINY_RES, min_size=8)
    params = dict(num_workers=1, rows_per_shard=5, levels=2,
                  decomposition=DecompositionConfig(order=2, max_outer=4, cg_maxiter=100))
    params.update(pre)
    return data, PreprocessConfig(**params), StorageConfig(root=root)


def pytest_configure(config):
    """Without CUDA, Triton kernels run in Triton's CPU interpreter (read by triton when it is first
    imported, so it is set before any test module imports it)."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_sample_grid(png, tiles: int, side: int) -> None:
    """A ``c2f generate`` grid: one labelled row of ``tiles`` images of ``side`` px, each
    nearest-upscaled by an integer factor to at least ``MIN_TILE`` px, 2 px apart, a label margin
    on the left (under 200 px)."""
    from PIL import Image

    from coarse2fine.evaluate.tracking import MIN_TILE

    tile = side * -(-MIN_TILE // side)
    w, h = Image.open(png).size
    assert h == tile + 2 * 2 and tiles * (tile + 2) + 2 < w < tiles * (tile + 2) + 2 + 200, (w, h, tile)
