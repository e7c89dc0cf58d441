"""What the generic Ray Train loop (``train/launch.py``) trains: one task per model kind, each a
thin wrapper that reads its columns and calls a plain step of ``train/steps.py`` with what its
method plug-in declares (model builder, token layout, loss, sampler)."""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train import data
from coarse2fine.train.config import GeneratorTrainConfig, TrainConfig
from coarse2fine.train.losses import LossWeights, PerceptualChoice, build_perceptual
from coarse2fine.train.methods.base import GeneratorMethod, SampleSettings, TokenizerMethod, usage_groups
from coarse2fine.train.models.discriminator import PatchDiscriminator
from coarse2fine.train.steps import generator_train_step, tokenizer_eval_step, tokenizer_train_step, unwrap

PREVIEW = 8  # images in a training preview grid


class Task(Protocol):
    """What the generic Ray Train loop needs from one kind of model (tokenizer, generator)."""

    method: TokenizerMethod | GeneratorMethod
    columns: list[str]  # dataset columns a worker reads from each shard of its rows
    model_cfg: Any  # a dataclass, saved in the checkpoint as ``model_config``
    betas: tuple[float, float]

    def decode(self, rows: pa.Table) -> dict[str, torch.Tensor]:
        """Rows of one shard (``columns``) → the tensors a step takes, first dimension the row."""

    def build(self) -> torch.nn.Module: ...

    def extras(self) -> dict[str, tuple[torch.nn.Module, float]]:
        """Further trained modules with their own AdamW and learning rate (the discriminator), by name."""

    def train_step(self, model, optimizer, scheduler, extras: dict, batch: dict[str, torch.Tensor], step: int,
                   device: torch.device) -> dict[str, float]: ...

    def preview(self, model, batch: dict[str, torch.Tensor], device: torch.device
                ) -> tuple[np.ndarray, str, list[str]]:
        """Images (N, 3, H, W) in [0, 1] of a batch's first rows for the logger, their grid's name
        and its row labels."""


class TokenizerTask:
    """A tokenizer on the ``images`` dataset (joined by key with ``decomposition_uri`` when its
    method takes Mumford–Shah bases): L2 + perceptual + the quantizer's loss (+ adversarial), with
    the perceptual loss the stage resolved (``perceptual``)."""

    columns = ["key", "image"]
    betas = (0.9, 0.99)

    def __init__(self, method: TokenizerMethod, model_cfg, train: TrainConfig, perceptual: PerceptualChoice,
                 decomposition_uri: str | None = None) -> None:
        self.method, self.model_cfg, self.train, self.perceptual = method, model_cfg, train, perceptual
        self._distance = None  # the perceptual module, built on the worker at the first step
        self.factors = method.factors(model_cfg)
        assert not self.factors or decomposition_uri, f"{method.name} reads the decomposition dataset"
        self.decomposition_uri = decomposition_uri
        self._bases = None  # the decomposition join (data.Bases), indexed on the worker at the first shard
        self.groups = usage_groups(method.layout(model_cfg))
        self.weights = LossWeights(perceptual=train.perceptual_weight, adversarial=train.adversarial_weight,
                                   adversarial_start=int(train.adversarial_start * train.max_steps),
                                   adaptive=train.adaptive_weight, lecam=train.lecam_weight)

    def decode(self, rows):
        out = data.decode_images(rows)
        if self.factors:
            if self._bases is None:
                self._bases = data.Bases(self.decomposition_uri, self.factors)
            out["bases"] = self._bases(rows.column("key").to_pylist())
        return out

    def build(self):
        return self.method.build(self.model_cfg)

    def extras(self):
        lr = self.train.disc_lr or self.train.lr
        disc = PatchDiscriminator(self.train.disc_channels, self.train.disc_layers)
        return {"disc": (disc, lr)} if self.train.adversarial_weight > 0 else {}

    def train_step(self, model, optimizer, scheduler, extras, batch, step, device):
        disc, disc_opt = extras.get("disc", (None, None))
        if self._distance is None and self.perceptual.kind != "off":
            self._distance = build_perceptual(self.perceptual).to(device)
        bases = batch["bases"].to(device) if self.factors else None
        return tokenizer_train_step(model, optimizer, scheduler, batch["image"].to(device), self.weights,
                                    self.train.clip_norm, step, disc, disc_opt, self.groups, bases,
                                    self._distance, self.method.last_layer(unwrap(model)))

    def preview(self, model, batch, device):
        x = batch["image"][:PREVIEW].to(device)
        recon, _ = tokenizer_eval_step(model, x, batch["bases"][:PREVIEW].to(device) if self.factors else None)
        return torch.cat([x, recon]).float().cpu().numpy(), "reconstructions", ["original", "reconstruction"]


class GeneratorTask:
    """A generator on a ``tokens`` dataset of ``layout``; previews decode class-conditional
    samples with the tokenizer of ``tokenizer_uri``."""

    def __init__(self, method: GeneratorMethod, model_cfg, train: GeneratorTrainConfig, layout: list[TokenColumn],
                 tokenizer_uri: str) -> None:
        self.method, self.model_cfg, self.train, self.tokenizer_uri = method, model_cfg, train, tokenizer_uri
        self.layout, self.betas = layout, method.betas
        self.columns = ["key", "label"] + [c.name for c in layout]
        self._tokenizer = None  # loaded on the worker at first use (loss or preview), then kept

    def decode(self, rows):
        return data.decode_tokens(rows, self.layout, self.model_cfg.null_class)

    def tokenizer(self, device):
        """The frozen tokenizer, loaded on the worker at first use and kept."""
        from coarse2fine.train.checkpoints import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_uri, device).requires_grad_(False)
        return self._tokenizer

    def build(self):
        return self.method.build(self.model_cfg)

    def extras(self):
        return {}

    def train_step(self, model, optimizer, scheduler, extras, batch, step, device):
        return generator_train_step(model, optimizer, scheduler, batch["tokens"].to(device),
                                    batch["label"].to(device), partial(self.method.loss, tokenizer=self.tokenizer(device)),
                                    self.train.clip_norm)

    def preview(self, model, batch, device):
        cond = batch["label"][:PREVIEW].to(device)
        _, images = self.method.sample(unwrap(model), self.tokenizer(device), cond, SampleSettings(), self.train.seed)
        return images.float().cpu().numpy(), "samples", ["samples"]
