"""The one owner of training checkpoints: save, resume, warm start and load (local path or any
fsspec URI, gs:// included).

``{dir}/state.pt`` holds the state dicts of the trained modules and their optimisers, the step,
the RNG state, and what is needed to rebuild the model without the config: ``kind``
(tokenizer / generator), ``method`` (a registry name) and ``model_config`` (its dataclass as a dict).
"""

from __future__ import annotations

import os
import pickle
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import torch

from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train.steps import unwrap

CHECKPOINT_FILE = "state.pt"


def save_state(directory: str, kind: str, method: str, model_cfg, stateful: dict[str, Any], step: int) -> None:
    """Write ``state.pt`` into a local ``directory`` (Ray Train uploads it)."""
    state = {k: unwrap(v).state_dict() for k, v in stateful.items()}
    state |= {"step": step, "rng": torch.get_rng_state(), "kind": kind, "method": method,
              "model_config": asdict(model_cfg)}
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))


def read_state(checkpoint_uri: str, device: str | torch.device = "cpu") -> dict:
    """The saved state of a checkpoint folder."""
    with fsspec.open(posixpath.join(checkpoint_uri.rstrip("/"), CHECKPOINT_FILE), "rb") as f:
        state = torch.load(f, map_location=device, weights_only=False)
    if "method" not in state:
        raise UserValueError(f"{checkpoint_uri} was saved before checkpoints recorded their method: retrain it "
                             "(the run fingerprint changed with the code, so `c2f run` does that by itself)")
    return state


def newest_state(run_uri: str, device: str | torch.device = "cpu", newer_than: str | None = None) -> dict | None:
    """The state of the newest complete checkpoint folder of a Ray Train run on disk
    (``checkpoint_<time>`` folders sort by time; one whose ``state.pt`` is missing or unreadable,
    e.g. cut by a kill, is skipped), or None — None too when none is newer than the folder named
    ``newer_than`` (Ray's checkpoint, already loaded). Ray's own checkpoint list can lag behind the
    disk after a kill -9, so a resume takes whichever is newer."""
    fs, path = fsspec.core.url_to_fs(run_uri)
    if not fs.exists(path):
        return None
    for folder in reversed(_checkpoint_folders(fs, path)):
        if posixpath.basename(folder.rstrip("/")) == newer_than:
            return None
        if fs.exists(posixpath.join(folder, CHECKPOINT_FILE)):
            try:
                with fs.open(posixpath.join(folder, CHECKPOINT_FILE), "rb") as f:
                    return torch.load(f, map_location=device, weights_only=False)
            except (EOFError, RuntimeError, OSError, ValueError, pickle.UnpicklingError):  # cut mid-write
                continue
    return None


def _checkpoint_folders(fs, path: str) -> list[str]:
    """Ray Train's ``checkpoint_<time>`` folders of a run, oldest first (not its
    ``checkpoint_manager_snapshot.json``, a file)."""
    return sorted(e["name"] for e in fs.ls(path, detail=True)
                  if e["type"] == "directory" and posixpath.basename(e["name"].rstrip("/")).startswith("checkpoint_"))


def prune(run_uri: str, keep: list[str]) -> list[str]:
    """Delete the checkpoint folders of a finished Ray Train invocation that Ray no longer lists
    (``keep``: the folders it does, by name): after a kill -9 and a resume, Ray's retention
    (``num_to_keep``) does not know the folders the killed invocation wrote, nor one cut
    mid-write. Returns the deleted folder names."""
    fs, path = fsspec.core.url_to_fs(run_uri)
    names = {posixpath.basename(k.rstrip("/")) for k in keep}
    assert names, "Ray lists no checkpoint: nothing may be deleted"
    stray = [f for f in _checkpoint_folders(fs, path) if posixpath.basename(f.rstrip("/")) not in names]
    for folder in stray:
        fs.rm(folder, recursive=True)
    return [posixpath.basename(f.rstrip("/")) for f in stray]


def resume(stateful: dict[str, Any], state: dict) -> int:
    """Restore every module, optimiser and scheduler and the RNG; return the step to continue from."""
    for k, obj in stateful.items():
        unwrap(obj).load_state_dict(state[k])
    torch.set_rng_state(state["rng"])
    return state["step"]


def warm_start(stateful: dict[str, Any], checkpoint_uri: str, names: list[str], device) -> None:
    """Weights of ``names`` from a finished run; optimisers and schedule start fresh (nightly retraining)."""
    state = read_state(checkpoint_uri, device)
    for name in names:
        unwrap(stateful[name]).load_state_dict(state[name])


MODEL_KEYS = ("model", "step", "kind", "method", "model_config")
"""What a weights-only export keeps of a training state (no optimisers, discriminator or RNG)."""


def export_model(checkpoint_uri: str, directory: str) -> str:
    """Write the model of a training checkpoint, weights only, as ``directory/state.pt``: a folder
    :func:`load_model` reads like a checkpoint (a third of the size without AdamW's moments)."""
    state = read_state(checkpoint_uri)
    path = os.path.join(directory, CHECKPOINT_FILE)
    torch.save({k: state[k] for k in MODEL_KEYS}, path)
    return path


def load_model(checkpoint_uri: str, device: str | torch.device = "cpu", kind: str | None = None):
    """(method, model in eval mode on ``device``) of a checkpoint; ``kind`` checks what it holds."""
    from coarse2fine.train import methods

    state = read_state(checkpoint_uri, device)
    if kind is not None and state["kind"] != kind:
        raise UserValueError(f"{checkpoint_uri} holds a {state['kind']}, not a {kind}")
    method = methods.get(state["kind"], state["method"])
    model = method.build(method.config_cls(**state["model_config"]))
    model.load_state_dict(state["model"])
    return method, model.to(device).eval()


def load_tokenizer(checkpoint_uri: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The tokenizer saved in ``{checkpoint_uri}/state.pt``, in eval mode on ``device``."""
    return load_model(checkpoint_uri, device, "tokenizer")[1]


def load_generator(checkpoint_uri: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The generator saved in ``{checkpoint_uri}/state.pt``, in eval mode on ``device``."""
    return load_model(checkpoint_uri, device, "generator")[1]


@dataclass
class Pair:
    """A generator and its tokenizer, loaded with the methods their checkpoints record."""

    method: object  # GeneratorMethod
    generator: torch.nn.Module
    tok_method: object  # TokenizerMethod
    tokenizer: torch.nn.Module

    def supported(self) -> list[str]:
        """The capabilities the generator offers over this tokenizer."""
        return self.method.supported(self.tok_method, self.tokenizer.cfg)

    def require(self, capability: str) -> None:
        """One-line UnsupportedError naming the methods and what they support, unless they do ``capability``."""
        self.method.require(capability, self.tok_method, self.tokenizer.cfg)


def load_pair(generator_uri: str, tokenizer_uri: str, device: str | torch.device = "cpu") -> Pair:
    """A generator checkpoint and its tokenizer's, both in eval mode on ``device``."""
    method, generator = load_model(generator_uri, device, "generator")
    tok_method, tokenizer = load_model(tokenizer_uri, device, "tokenizer")
    return Pair(method, generator, tok_method, tokenizer)
