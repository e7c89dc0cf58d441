"""The one typed config, loaded from YAML with ``--set dotted.key=value`` overrides.

Only entry points (the CLI and the Prefect flow) call :func:`load_config`; stages receive
their own section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from coarse2fine.evaluate.config import EvaluateConfig, TrackingConfig
from coarse2fine.preprocess.config import (
    DataConfig,
    PreprocessConfig,
    Section,
    StorageConfig,
    check_levels,
)
from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train import methods
from coarse2fine.train.config import GeneratorConfig, RayConfig, TokenizerConfig


class ConfigError(UserValueError):
    """A config file or override that cannot be used; the message is one line for the user."""


PAIR_SECTIONS = ("tokenizer.", "generator.")
"""What a pair may override: its models. Data, preprocessing and evaluation are shared by every pair
(one preprocessing, one FID protocol), or the comparison would not compare like with like."""
PAIR_FIXED = ("tokenizer.method", "generator.method", "generator.guidance", "generator.temperature",
              "generator.top_k", "generator.top_p", "generator.steps", "generator.eval_samples")
"""Keys under those sections a pair may not override: its methods (the pair names them) and the
sampling settings and sample count, which are part of the generator evaluation protocol."""


class PairConfig(Section):
    """One tokenizer:generator pair the flow trains and evaluates, written ``sit:ar_sit`` or
    ``{pair: cq:maskgit, overrides: {tokenizer.train.max_steps: 500}}`` (dotted keys under
    ``tokenizer.`` / ``generator.`` only)."""

    pair: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"pair": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> "PairConfig":
        tok, sep, gen = self.pair.partition(":")
        if not sep or tok not in methods.TOKENIZERS or gen not in methods.GENERATORS:
            raise ValueError(f"{self.pair!r} is not tokenizer:generator with tokenizer one of "
                             f"{', '.join(methods.TOKENIZERS)} and generator one of {', '.join(methods.GENERATORS)}")
        wrong = [k for k in self.overrides if not k.startswith(PAIR_SECTIONS) or k in PAIR_FIXED]
        if wrong:
            raise ValueError(f"pair {self.pair}: overrides may only change tokenizer.* and generator.* (not their "
                             f"methods or sampling settings), not {', '.join(wrong)} (every pair shares the data and "
                             "the evaluation protocol)")
        return self

    @property
    def methods(self) -> tuple[str, str]:
        tok, _, gen = self.pair.partition(":")
        return tok, gen


class Config(Section):
    """Every section; each stage receives only its own (plus URIs). ``pairs`` lists the
    tokenizer:generator pairs the flow compares; empty = the one pair ``tokenizer.method`` :
    ``generator.method``."""

    data: DataConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    pairs: list[PairConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        check_levels(self.data, self.preprocess)
        self.tokenizer.model_config_for(self.data.resolution)  # raises ValueError on impossible shapes
        self.generator.method_plugin().check_params(self.generator.params())  # before any training
        names = [p.pair for p in self.pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pairs: each pair once, got {', '.join(names)}")
        return self

    def pair_configs(self) -> list[tuple[str, "Config"]]:
        """``(tokenizer:generator, its config)`` per pair: this config with the pair's methods and
        overrides (and no pairs of its own). Validated here, by what runs the pairs (the flow and
        ``c2f run`` before it starts), not on every load: a single-stage command with, say,
        another resolution must not fail over a pair it does not run. :class:`ConfigError`."""
        if not self.pairs:
            return [(f"{self.tokenizer.method}:{self.generator.method}", self)]
        out = []
        for p in self.pairs:
            tree = self.model_dump(mode="json", exclude={"pairs"})
            tok, gen = p.methods
            tree["tokenizer"]["method"], tree["generator"]["method"] = tok, gen
            for dotted, value in p.overrides.items():
                _set(tree, dotted.split("."), value)
            try:
                out.append((p.pair, Config.model_validate(tree)))
            except ValidationError as e:
                raise ConfigError(f"pair {p.pair}: {_one_line(e)}") from None
        return out


def _set(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    dotted, raw = item.split("=", 1)
    _set(tree, dotted.strip().split("."), yaml.safe_load(raw) if raw.strip() else "")


def _moved(loc: tuple) -> str:
    """Where a key of the configs before the method registry lives now ('' if it is just unknown)."""
    if loc == ("train",):
        return "; tokenizer training settings live in tokenizer.train"
    if len(loc) == 2 and loc[0] in ("tokenizer", "generator"):
        registry = methods.TOKENIZERS if loc[0] == "tokenizer" else methods.GENERATORS
        owners = [name for name, m in registry.items() if loc[1] in m.params.model_fields]
        if owners:
            return f"; method parameters live in {' / '.join(f'{loc[0]}.{o}.{loc[1]}' for o in owners)}"
    return ""


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = "unknown key" + _moved(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section (lists and scalars are replaced, not appended)."""
    merged = dict(base)
    for k, v in top.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


Paths = str | Path | list[str | Path] | None


def _load_tree(paths: Paths, overrides: list[str]) -> dict:
    """Files in order (a later file, e.g. an ``infra/`` overlay, overrides an earlier one), then overrides."""
    tree: dict = {}
    for path in [] if paths is None else paths if isinstance(paths, list) else [paths]:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layer = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(layer, dict):
            raise ConfigError(f"{p} must hold a mapping of sections")
        tree = _merge(tree, layer)
    for item in overrides:
        _apply_override(tree, item)
    return tree


def load_config(path: Paths, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start empty), apply overrides, validate; raise :class:`ConfigError`."""
    return config_from_tree(_load_tree(path, []), overrides or [])


def config_from_tree(tree: dict, overrides: list[str]) -> Config:
    """A config from an already-read tree (e.g. the one a run recorded) with ``overrides``."""
    tree = _merge({}, tree)
    for item in overrides:
        _apply_override(tree, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from e


def load_section(path: Paths, overrides: list[str] | None, name: str) -> Section:
    """Only one section (e.g. ``evaluate`` for ``c2f fid``): other sections may be absent."""
    model = Config.model_fields[name].annotation
    tree = _load_tree(path, overrides or [])
    try:
        return model.model_validate(tree.get(name) or {})
    except ValidationError as e:
        raise ConfigError(f"{name}.{_one_line(e)}") from e


def table_variants(path: str | Path) -> dict[str, list[str]]:
    """A table of named variants (``configs/tables/*.yaml``: ``base`` and ``rows`` of dotted keys) as
    ``key=value`` overrides per row, the base's first."""
    table = yaml.safe_load(Path(path).read_text())
    fmt = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731  (YAML scalars as --set reads them)
    return {name: [f"{k}={fmt(v)}" for k, v in (table["base"] | (row or {})).items()] for name, row in table["rows"].items()}
