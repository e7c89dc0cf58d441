"""What a method plug-in declares (the registry in ``train/methods/__init__.py`` lists them).

A tokenizer method turns images into a ``tokens`` dataset of a declared layout; a generator method
models such a layout. Each declares its typed parameter section (config ``tokenizer.<name>`` /
``generator.<name>``, derived from its model dataclass so defaults live in one place), its model
config and builder, the datasets it reads, its token layout, the modules of its code fingerprint
and its capabilities. Stages, the Ray launch, tokenization, evaluation and the CLI dispatch only
through these objects; a generator's evaluation returns a ``GeneratorReport`` (rows per sampling
setting) that the evaluation stage logs without knowing the method.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import numpy as np
import pydantic
import torch

from coarse2fine.preprocess.config import Section
from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.preprocess.schema import TokenColumn

# Modules every trained model runs through (the generic loop, checkpoints, data order, steps).
SHARED_CODE = ("train.data", "train.launch", "train.tasks", "train.steps", "train.checkpoints", "train.methods.base")

# Capabilities. Tokenizer: ``decode_prefix`` = decodes the first groups of a sequence into a
# coarser image; ``encode_prefix`` = encodes a lower-resolution image into the first groups.
# Generator: what the sampling commands offer, and which tokenizer capability each needs.
NEEDS = {"stop_scale": {"decode_prefix"}, "refine": {"decode_prefix"}, "upsample": {"encode_prefix"},
         "edit": {"encode_prefix", "decode_prefix"},  # edit also shows the kept scales decoded
         "steps": set()}  # a number of parallel decoding steps (masked generation)
OPTIONS = {"stop_scale": "--stop-scale", "refine": "c2f refine", "upsample": "c2f upsample", "edit": "c2f edit",
           "steps": "--steps"}


@dataclass(frozen=True)
class SampleSettings:
    """Sampling settings every generator takes (CFG scale; 1 = off; top-k 0 and top-p 1 = off)."""

    guidance: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    steps: int | None = None  # decoding steps of a parallel decoder (None = the method's default)


class UnsupportedError(UserValueError):
    """A method asked for something it does not do (a user error: one line, exit 2)."""


def params_section(config_cls: type, derived: tuple[str, ...], doc: str) -> type[Section]:
    """The typed config section of a method: the fields of its model dataclass that the user sets
    (``derived`` ones come from the data or the tokens layout), with the dataclass's defaults."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(config_cls) if f.name not in derived}
    assert all(d is not dataclasses.MISSING for _, d in fields.values()), "section fields need defaults"
    return pydantic.create_model(f"{config_cls.__name__}Section", __base__=Section, __doc__=doc, **fields)


def usage_groups(layout: list[TokenColumn]) -> list[tuple[str, int, int]]:
    """(metric name, vocabulary, tokens) of each id column: ``{role}_{i}`` (e.g. ``scale_0``), in
    the order of the flat id sequence."""
    seen: dict[str, int] = {}
    groups = []
    for c in layout:
        if c.vocab:
            groups.append((f"{c.role}_{seen.get(c.role, 0)}", c.vocab, c.size))
            seen[c.role] = seen.get(c.role, 0) + 1
    return groups


def modules(names: tuple[str, ...]) -> list[ModuleType]:
    return [importlib.import_module(f"coarse2fine.{n}") for n in names]


class Method(ABC):
    """Common declarations of tokenizer and generator methods."""

    kind: ClassVar[str]
    name: ClassVar[str]
    summary: ClassVar[str]
    config_cls: ClassVar[type]
    params: ClassVar[type[Section]]
    code: ClassVar[tuple[str, ...]]  # module names under coarse2fine (besides SHARED_CODE)

    def code_modules(self) -> list[ModuleType]:
        return modules(SHARED_CODE + self.code)

    @abstractmethod
    def build(self, model_cfg) -> torch.nn.Module:
        """The model of this method for its model dataclass (the method's one builder)."""

    def model_modules(self) -> list[ModuleType]:
        """The method's own modules (what encoding or sampling runs, without the training loop)."""
        return modules(self.code)


class TokenizerMethod(Method):
    kind = "tokenizer"
    reads: ClassVar[tuple[str, ...]] = ("images",)

    @abstractmethod
    def model_config(self, params: Section, resolution: int):
        """The model dataclass for images of ``resolution`` (ValueError on impossible shapes)."""

    @abstractmethod
    def layout(self, model_cfg) -> list[TokenColumn]:
        """The token columns this tokenizer writes (the tokens manifest records them)."""

    def capabilities(self, model_cfg) -> frozenset[str]:
        return frozenset()

    def factors(self, model_cfg) -> int:
        """How many Mumford–Shah bases B_1 … B_k the model takes beside each image (``bases``
        below): k > 0 reads the ``decomposition`` dataset joined with ``images`` by key; 0 reads
        ``images`` only."""
        return 0

    def describe(self, model_cfg) -> str:
        """A few words naming the variant (shown in errors and summaries)."""
        return self.name

    def calibrate(self, model: torch.nn.Module, layout: list[TokenColumn], images_uri: str) -> list[TokenColumn]:
        """The layout with what the training images of ``images_uri`` determine filled in (a latent
        tokenizer's normalisation scale), deterministically (the layout is fingerprinted);
        unchanged by default."""
        return layout

    @abstractmethod
    def encode(self, model: torch.nn.Module, x_B3HW: torch.Tensor, bases: torch.Tensor | None = None
               ) -> dict[str, np.ndarray]:
        """Images in [0, 1] (and their bases (B, k, 3, H, W) when :meth:`factors` is k > 0) → one
        array (B, *shape) per layout column."""

    @abstractmethod
    def reconstruct(self, model: torch.nn.Module, x_B3rr: torch.Tensor, bases: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction in [0, 1] at the input's resolution and the ids (B, L) in the order of
        :func:`usage_groups` of the layout (evaluation)."""

    def last_layer(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The decoder's output layer (VQGAN's adaptive adversarial weight compares gradient norms
        there): by default the output conv of the shared conv decoder (``models/conv_ae.py``)."""
        return [model.decoder.body[-1].weight]

    def eval_resolutions(self, model_cfg) -> list[int]:
        """Resolutions the reconstruction table reports, full resolution first."""
        return [model_cfg.resolution]

    def check_input_side(self, model_cfg, side: int) -> None:
        """:class:`UnsupportedError` unless the model encodes square images of ``side`` pixels."""
        check(side == model_cfg.resolution, f"tokenizer method {self.name} encodes {model_cfg.resolution}px images, "
                                            f"not {side}px")


class GeneratorMethod(Method):
    kind = "generator"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    betas: ClassVar[tuple[float, float]] = (0.9, 0.95)
    example_layout: ClassVar[list[TokenColumn]]  # a small layout it accepts (checks parameters at config load)

    def check_params(self, params: Section) -> None:
        """ValueError on parameters no layout could make valid (at config load, before any training)."""
        self.model_config(params, self.example_layout, 0)

    @abstractmethod
    def accept(self, layout: list[TokenColumn]) -> None:
        """Raise :class:`UnsupportedError` when this method cannot model ``layout``."""

    @abstractmethod
    def model_config(self, params: Section, layout: list[TokenColumn], num_classes: int):
        """The model dataclass, sized from the tokens layout (not from the tokenizer checkpoint)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, cond_B: torch.Tensor, tokenizer: torch.nn.Module
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of a batch (its forward runs through ``model``, which may be DDP-wrapped)
        and per-part diagnostics. ``tokenizer``: the frozen tokenizer of the tokens, for methods
        whose inputs are its reconstructions (CART, as VAR)."""

    @abstractmethod
    def sample(self, generator, tokenizer, classes_B: torch.Tensor, settings, seed: int,
               stop: int | None = None, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences (B, L') and images (B, 3, r, r) in [0, 1]."""

    @abstractmethod
    def passes(self, model_cfg, settings) -> dict[str, int]:
        """Forward passes per image of one :meth:`sample` call with ``settings``: the transformer's
        (``forward_passes``; each may carry many tokens, and CFG doubles the batch, not the passes) and
        the diffusion head's (``diffusion_passes``, 0 for discrete tokens). Evaluation reports them."""

    @abstractmethod
    def evaluate(self, pair, images_uri: str, cfg, settings, num_samples: int, seed: int):
        """The method's ``GeneratorReport`` (FID etc.) of a loaded ``checkpoints.Pair``, logged by
        ``pipelines/stages.py``."""

    def upsample(self, generator, tokenizer, low_B3rr, classes_B, settings, seed):
        """Low-resolution images → generated full-resolution ones (capability ``upsample``)."""
        raise UnsupportedError(f"generator method {self.name} does not upsample")

    def edit(self, generator, tokenizer, image_B3RR, keep, classes_B, settings, seed):
        """(edited images, what was kept, decoded) (capability ``edit``)."""
        raise UnsupportedError(f"generator method {self.name} does not edit")

    def supported(self, tokenizer_method: TokenizerMethod, tokenizer_cfg) -> list[str]:
        """The capabilities this generator offers over this tokenizer."""
        have = tokenizer_method.capabilities(tokenizer_cfg)
        return sorted(c for c in self.capabilities if NEEDS[c] <= have)

    def require(self, capability: str, tokenizer_method: TokenizerMethod, tokenizer_cfg) -> None:
        """:class:`UnsupportedError` naming the method and what it supports, unless it does ``capability``."""
        ok = self.supported(tokenizer_method, tokenizer_cfg)
        if capability not in ok:
            offered = ", ".join(["c2f generate"] + [OPTIONS[c] for c in ok])
            raise UnsupportedError(
                f"{OPTIONS[capability]} is not supported by generator method {self.name} over tokenizer method "
                f"{tokenizer_method.name} ({tokenizer_method.describe(tokenizer_cfg)}); it supports: {offered}")


def check(cond: bool, message: str) -> None:
    if not cond:
        raise UnsupportedError(message)

