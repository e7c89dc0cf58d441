"""Loading a trained tokenizer from a checkpoint folder (local path or any fsspec URI)."""

from __future__ import annotations

import posixpath

import fsspec
import torch

from coarse2fine.train.models.sit import SITConfig, SpectralTokenizer, build_tokenizer

CHECKPOINT_FILE = "state.pt"  # written by train.launch.save_state


def load_tokenizer(checkpoint_uri: str, device: str | torch.device = "cpu") -> SpectralTokenizer:
    """The tokenizer saved in ``{checkpoint_uri}/state.pt``, in eval mode on ``device``."""
    with fsspec.open(posixpath.join(checkpoint_uri.rstrip("/"), CHECKPOINT_FILE), "rb") as f:
        state = torch.load(f, map_location=device, weights_only=False)
    model = build_tokenizer(SITConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()
