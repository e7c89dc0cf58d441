"""Typed config sections used by preprocessing (validated on construction).

Only entry points read YAML; they build these models and pass each stage its own section.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def absolute_local(uri: str) -> str:
    """Local paths become absolute (Beam and Ray workers run in other working directories);
    URIs with a scheme (gs://, memory://, file://) are left as they are."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


class DataConfig(Section):
    """Where the input images come from and how they are normalised.

    ``source``: an fsspec URI of a folder of image files (file://, gs://, memory:// or a local
    path) or of a Parquet file/folder with an image-bytes column. ``label_from``: ``folder`` takes
    class labels from the first sub-folder under ``source``, ``none`` stores no label, any other
    value names a Parquet column.
    """

    source: str
    resolution: int = Field(64, ge=8)
    min_size: int = Field(16, ge=1, description="reject images whose shorter side is smaller")
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    label_from: str = "folder"
    image_column: str = "image"
    max_pixels: int = Field(89_478_485, ge=1, description="inputs with more pixels are rejected before decoding "
                            "(Pillow's decompression-bomb threshold)")

    _abs_source = field_validator("source")(lambda v: absolute_local(v))

    @field_validator("resolution")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("resolution must be even (the Haar DWT halves it)")
        return v


class DecompositionConfig(Section):
    """Ambrosio–Tortorelli base/detail decomposition (CART eq. 8; defaults from the seed, §4)."""

    order: int = Field(3, ge=1)
    alpha: float = Field(10.0, gt=0)
    lambda_: float = Field(0.01, gt=0)
    epsilon: float = Field(0.02, gt=0, description="edge-band width in pixels")
    max_outer: int = Field(10, ge=1)
    outer_tol: float = Field(1e-3, gt=0)
    cg_tol: float = Field(1e-4, gt=0)
    cg_maxiter: int = Field(500, ge=1)


class PreprocessConfig(Section):
    """Beam jobs: runner, parallelism, DWT levels, tensor dtype and the decomposition."""

    runner: str = Field("local", description="'local' (in-process Beam FnApiRunner) or a Beam runner name")
    runner_options: list[str] = Field(default_factory=list, description="extra Beam pipeline flags")
    num_workers: int = Field(1, ge=1, description="local runner: direct_num_workers")
    rows_per_shard: int = Field(256, ge=1)
    levels: int = Field(3, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    decomposition: DecompositionConfig = Field(default_factory=DecompositionConfig)


class StorageConfig(Section):
    """Root under which every stage writes ``{root}/{stage}/{fingerprint}/``."""

    root: str = ".c2f/store"

    _abs_root = field_validator("root")(lambda v: absolute_local(v))


def check_levels(data: DataConfig, pre: PreprocessConfig) -> None:
    """The DWT needs the resolution divisible by 2**levels."""
    if data.resolution % (2**pre.levels):
        raise ValueError(
            f"data.resolution={data.resolution} is not divisible by 2**preprocess.levels={2**pre.levels}"
        )


__all__ = [
    "DataConfig",
    "DecompositionConfig",
    "PreprocessConfig",
    "StorageConfig",
    "check_levels",
]
