"""Loading trained tokenizers and generators from checkpoint folders (local path or any fsspec URI)."""

from __future__ import annotations

import posixpath

import fsspec
import torch

from coarse2fine.train.models.arsit import ARSIT, ARSITConfig, build_generator
from coarse2fine.train.models.sit import SITConfig, SpectralTokenizer, build_tokenizer

CHECKPOINT_FILE = "state.pt"  # written by train.launch._save_state


def _load(checkpoint_uri: str, device, config_cls, builder):
    with fsspec.open(posixpath.join(checkpoint_uri.rstrip("/"), CHECKPOINT_FILE), "rb") as f:
        state = torch.load(f, map_location=device, weights_only=False)
    model = builder(config_cls(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_tokenizer(checkpoint_uri: str, device: str | torch.device = "cpu") -> SpectralTokenizer:
    """The tokenizer saved in ``{checkpoint_uri}/state.pt``, in eval mode on ``device``."""
    return _load(checkpoint_uri, device, SITConfig, build_tokenizer)


def load_generator(checkpoint_uri: str, device: str | torch.device = "cpu") -> ARSIT:
    """The AR-SIT generator saved in ``{checkpoint_uri}/state.pt``, in eval mode on ``device``."""
    return _load(checkpoint_uri, device, ARSITConfig, build_generator)
