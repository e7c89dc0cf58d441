"""What the generic Ray Train loop (``train/launch.py``) trains: one task per model kind, each a
thin wrapper that reads its columns and calls a plain step of ``train/steps.py`` with what its
method plug-in declares (model builder, token layout, loss, sampler)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train import data
from coarse2fine.train.config import GeneratorTrainConfig, TrainConfig
from coarse2fine.train.losses import LossWeights
from coarse2fine.train.methods.base import GeneratorMethod, SampleSettings, TokenizerMethod, usage_groups
from coarse2fine.train.models.discriminator import PatchDiscriminator
from coarse2fine.train.steps import generator_train_step, tokenizer_eval_step, tokenizer_train_step, unwrap

PREVIEW = 8  # images in a training preview grid


class Task(Protocol):
    """What the generic Ray Train loop needs from one kind of model (tokenizer, generator)."""

    method: TokenizerMethod | GeneratorMethod
    columns: list[str]  # dataset columns every worker reads
    model_cfg: Any  # a dataclass, saved in the checkpoint as ``model_config``
    betas: tuple[float, float]

    def load(self, rows: dict[str, list], rank: int, world: int) -> int:
        """Keep this rank's rows (decoded, in memory); return how many."""

    def build(self) -> torch.nn.Module: ...

    def extras(self) -> dict[str, torch.nn.Module]:
        """Further trained modules with their own AdamW (the discriminator), by name."""

    def train_step(self, model, optimizer, scheduler, extras: dict, idx: torch.Tensor, step: int,
                   device: torch.device) -> dict[str, float]: ...

    def preview(self, model, idx: torch.Tensor, device: torch.device) -> tuple[np.ndarray, str]:
        """Images (N, 3, H, W) in [0, 1] for the logger and their grid's name."""


class TokenizerTask:
    """A tokenizer on the ``images`` dataset: L2 + the quantizer's loss (+ adversarial)."""

    columns = ["key", "image"]
    betas = (0.9, 0.99)

    def __init__(self, method: TokenizerMethod, model_cfg, train: TrainConfig) -> None:
        self.method, self.model_cfg, self.train = method, model_cfg, train
        self.groups = usage_groups(method.layout(model_cfg))
        self.weights = LossWeights(adversarial=train.adversarial_weight,
                                   adversarial_start=int(train.adversarial_start * train.max_steps),
                                   lecam=train.lecam_weight)

    def load(self, rows, rank, world):
        self.images = data.decode_rows(rows["key"], rows["image"], rank, world)
        return len(self.images)

    def build(self):
        return self.method.build(self.model_cfg)

    def extras(self):
        return {"disc": PatchDiscriminator()} if self.train.adversarial_weight > 0 else {}

    def train_step(self, model, optimizer, scheduler, extras, idx, step, device):
        disc, disc_opt = extras.get("disc", (None, None))
        return tokenizer_train_step(model, optimizer, scheduler, self.images[idx].to(device), self.weights,
                                    self.train.clip_norm, step, disc, disc_opt, self.groups)

    def preview(self, model, idx, device):
        x = self.images[idx[:PREVIEW]].to(device)
        recon, _ = tokenizer_eval_step(model, x)
        return torch.cat([x, recon]).float().cpu().numpy(), "reconstructions"


class GeneratorTask:
    """A generator on a ``tokens`` dataset of ``layout``; previews decode class-conditional
    samples with the tokenizer of ``tokenizer_uri``."""

    def __init__(self, method: GeneratorMethod, model_cfg, train: GeneratorTrainConfig, layout: list[TokenColumn],
                 tokenizer_uri: str) -> None:
        self.method, self.model_cfg, self.train, self.tokenizer_uri = method, model_cfg, train, tokenizer_uri
        self.layout, self.betas = layout, method.betas
        self.columns = ["key", "label"] + [c.name for c in layout]
        self._tokenizer = None  # loaded on the worker at the first preview, then kept

    def load(self, rows, rank, world):
        self.tokens, self.labels = data.token_rows(rows, self.layout, self.model_cfg.null_class, rank, world)
        return len(self.tokens)

    def build(self):
        return self.method.build(self.model_cfg)

    def extras(self):
        return {}

    def train_step(self, model, optimizer, scheduler, extras, idx, step, device):
        return generator_train_step(model, optimizer, scheduler, self.tokens[idx].to(device),
                                    self.labels[idx].to(device), self.method.loss, self.train.clip_norm)

    def preview(self, model, idx, device):
        from coarse2fine.train.checkpoints import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_uri, device)
        cond = self.labels[idx[:PREVIEW]].to(device)
        _, images = self.method.sample(unwrap(model), self._tokenizer, cond, SampleSettings(), self.train.seed)
        return images.float().cpu().numpy(), "samples"
