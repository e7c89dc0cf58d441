"""Sampling applications of a finished generator run: generate (with early stop), refine,
upsample and edit. Each loads the generator and its tokenizer with the methods their checkpoints
record, checks that the pair supports what is asked (one-line error naming the method and what
it supports), writes a PNG grid and logs it to the generator's MLflow run."""

from __future__ import annotations

import json
from dataclasses import dataclass

import mlflow
import numpy as np
import torch
import torch.nn.functional as F

from coarse2fine.evaluate import tracking
from coarse2fine.pipelines import runs
from coarse2fine.pipelines.config import Config
from coarse2fine.pipelines.stages import sample_settings
from coarse2fine.preprocess.errors import UserKeyError, UserValueError
from coarse2fine.train.checkpoints import Pair, load_pair


@dataclass
class Loaded:
    """A finished generator run: its generator and tokenizer (``checkpoints.Pair``), the class
    names it was trained on, and the device they are on."""

    pair: Pair
    classes: list[str]
    device: torch.device

    def condition(self, label: str | None, n: int) -> torch.Tensor:
        null = self.pair.generator.cfg.null_class
        return torch.full((n,), class_id(label, self.classes, null), device=self.device)


def _load(cfg: Config, run_id: str) -> Loaded:
    from coarse2fine.evaluate.fid import resolve_device

    device = resolve_device(cfg.evaluate.device)
    tags = runs.finished_run(cfg.tracking, run_id, "generator")
    pair = load_pair(tags[runs.CHECKPOINT_TAG], tags["c2f.tokenizer_checkpoint"], device)
    return Loaded(pair, json.loads(tags.get("c2f.classes", "[]")), device)


def class_id(label: str | None, classes: list[str], null_class: int) -> int:
    """A class given by name or index (None = the null class, unconditional)."""
    if label is None:
        return null_class
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < null_class:  # null_class = number of classes
        return int(label)
    raise UserKeyError(f"unknown class {label!r}; known: {', '.join(classes) or 'none (unconditional model)'}")


def _save_grid(images_NCHW, out: str, run_id: str, row_labels: list[str], numbered: bool = False) -> None:
    """Write a PNG grid (one labelled row per label, tiles numbered if asked) to ``out`` and log it
    to the run under ``samples/``."""
    from PIL import Image

    Image.fromarray(tracking.labelled_grid(images_NCHW, row_labels, numbered=numbered)).save(out)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(out, "samples")


def _save_samples(ids, cond, images, run_id: str, seed: int, out: str) -> dict:
    """The grid PNG ``out`` and the token ids ``{out}.tokens.npz`` (what :func:`refine` continues),
    both logged to the generator's run under ``samples/``."""
    tokens_file = f"{out}.tokens.npz"
    np.savez(tokens_file, ids=ids.cpu().numpy(), classes=cond.cpu().numpy(), run_id=run_id, seed=seed)
    _save_grid(images.float().cpu().numpy(), out, run_id, [f"samples, {images.shape[-1]}px"], numbered=True)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(tokens_file, "samples")
    return {"grid": out, "tokens": tokens_file, "resolution": images.shape[-1], "num_tokens": ids.shape[1]}


def generate(cfg: Config, run_id: str, n: int, label: str | None, stop_scale: int | None, seed: int, out: str,
             **settings) -> dict:
    """Sample ``n`` images (stopped after ``stop_scale``), write the grid PNG and the token ids
    (``{out}.tokens.npz``, the input of :func:`refine`), log both to the generator's run."""
    run = _load(cfg, run_id)
    pair = run.pair
    if stop_scale is not None:
        pair.require("stop_scale")
    if settings.get("steps") is not None:
        pair.require("steps")
    cond = run.condition(label, n)
    ids, images = pair.method.sample(pair.generator, pair.tokenizer, cond, sample_settings(cfg, **settings), seed,
                                     stop_scale)
    return _save_samples(ids, cond, images, run_id, seed, out)


def refine(cfg: Config, run_id: str, tokens_file: str, select: list[int] | None, stop_scale: int | None,
           seed: int, out: str, **settings) -> dict:
    """Continue saved partial sequences (all, or the ``select``-ed rows) to ``stop_scale``."""
    run = _load(cfg, run_id)
    pair = run.pair
    pair.require("refine")
    saved = np.load(tokens_file)
    rows = select if select else list(range(len(saved["ids"])))
    if max(rows) >= len(saved["ids"]):
        raise UserKeyError(f"{tokens_file} holds {len(saved['ids'])} sequences; --select {max(rows)} is out of range")
    prefix = torch.from_numpy(saved["ids"][rows]).to(run.device)
    cond = torch.from_numpy(saved["classes"][rows]).to(run.device)
    ids, images = pair.method.sample(pair.generator, pair.tokenizer, cond, sample_settings(cfg, **settings), seed,
                                     stop_scale, prefix)
    return _save_samples(ids, cond, images, run_id, seed, out)


def _read_images(paths: list[str], resolution: int | None) -> torch.Tensor:
    """Image files → (B, 3, r, r) in [0, 1]; every file must be square with the same side."""
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if resolution and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, np.float32).transpose(2, 0, 1) / 255)
    if len({a.shape for a in arrays}) != 1 or arrays[0].shape[1] != arrays[0].shape[2]:
        raise UserValueError("images must be square and of one size")
    return torch.from_numpy(np.stack(arrays))


def upsample(cfg: Config, run_id: str, images: list[str], label: str | None, seed: int, out: str, **settings) -> dict:
    """Low-resolution images (side R/2^k) → full resolution; grid rows: input (nearest), output."""
    run = _load(cfg, run_id)
    pair = run.pair
    pair.require("upsample")
    low = _read_images(images, None).to(run.device)
    R = pair.tokenizer.cfg.resolution
    if low.shape[-1] >= R:
        raise UserValueError(f"upsample takes images smaller than the model's {R}px (R/2, R/4, …), got "
                             f"{low.shape[-1]}px; make one with e.g. PIL: Image.open(p).resize(({R // 2}, {R // 2}), "
                             f"Image.Resampling.BOX)")
    pair.tok_method.check_input_side(pair.tokenizer.cfg, low.shape[-1])
    cond = run.condition(label, len(low))
    _, up = pair.method.upsample(pair.generator, pair.tokenizer, low, cond, sample_settings(cfg, **settings), seed)
    grid = torch.cat([F.interpolate(low, size=(R, R), mode="nearest"), up]).float().cpu().numpy()
    _save_grid(grid, out, run_id, [f"input {low.shape[-1]}px", f"upsampled {R}px"])
    return {"grid": out, "input_resolution": low.shape[-1], "resolution": R}


def edit(cfg: Config, run_id: str, images: list[str], keep_scales: int, label: str | None, seed: int, out: str,
         **settings) -> dict:
    """Keep the first scales of each image, regenerate the rest under ``label``; grid rows: input,
    its kept scales decoded, the edit."""
    run = _load(cfg, run_id)
    pair = run.pair
    pair.require("edit")
    x = _read_images(images, pair.tokenizer.cfg.resolution).to(run.device)
    cond = run.condition(label, len(x))
    edited, kept = pair.method.edit(pair.generator, pair.tokenizer, x, keep_scales, cond,
                                    sample_settings(cfg, **settings), seed)
    kept = F.interpolate(kept, size=x.shape[-2:], mode="nearest")
    _save_grid(torch.cat([x, kept, edited]).float().cpu().numpy(), out, run_id,
               ["input", f"first {keep_scales} scales", "edited"])
    return {"grid": out, "keep_scales": keep_scales}


def decoded_tokens_row(tokens_uri: str, key: str) -> tuple[str, np.ndarray]:
    """A tokens row decoded, for ``c2f inspect --png``: (caption, (H, W, 3) image in [0, 1]). The
    row's image goes through the tokenizer checkpoint the manifest names (with its bases, for a
    method that takes them); the ids that decoding used are compared with the row's, so the caption
    says whether the picture is the decoding of exactly the stored tokens."""
    from coarse2fine.preprocess import inspection, schema
    from coarse2fine.train import data
    from coarse2fine.train.checkpoints import load_model

    manifest = schema.read_manifest(tokens_uri)
    method, model = load_model(manifest["config"]["checkpoint"], "cpu", "tokenizer")
    row = inspection.find_row(tokens_uri, key)
    x_13HW = torch.from_numpy(inspection.source_image(tokens_uri, row["key"]))[None].float()
    k = method.factors(model.cfg)
    bases = data.load_bases(manifest["inputs"]["decomposition"], [row["key"]], k) if k else None
    with torch.no_grad():
        recon, ids = method.reconstruct(model, x_13HW, bases)
    stored = [np.asarray(row[c["name"]]).ravel() for c in manifest["config"]["layout"] if c["vocab"]]
    if stored:
        flat = ids[0].reshape(-1).numpy()  # SIT's are (S, T) per image
        differ = int((np.concatenate(stored) != flat).sum())
        note = "exactly the row's ids" if differ == 0 else f"{differ} of {flat.size} ids differ from the row's"
    else:
        note = "the posterior mean"
    return f"decoded by {method.name} ({note})", recon[0].permute(1, 2, 0).numpy()
