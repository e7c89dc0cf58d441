"""AR-SIT applications on images (SIT seed §5.3–5.5): coarse-to-fine generation with early stop,
refinement of saved partial sequences, upsampling and editing. Pure functions of a generator, a
tokenizer and tensors; the CLI and the evaluation wrap them.

- Early stop (§5.3): sample the first ``s·N`` tokens and decode them with a scale-causal decoder
  (SIT-SC / SIT-SCD) into an image of the resolution of ``s`` scales.
- Upsampling (§5.4): a scale-causal encoder (SIT-SC / SIT-SCE) turns the low-resolution image into
  the first tokens; the generator continues from them.
- Editing (§5.5): the image is encoded with a scale-causal encoder (no leakage from fine to coarse
  scales), only the first ``keep_scales`` scales are kept and the rest is generated under a new class.
"""

from __future__ import annotations

import torch

from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.train.methods.base import SampleSettings
from coarse2fine.train.models.arsit import ARSIT
from coarse2fine.train.models.sit import SpectralTokenizer
from coarse2fine.train.sampling import sample_tokens


def check_pair(generator: ARSIT, tokenizer: SpectralTokenizer) -> None:
    """The generator must model this tokenizer's sequences."""
    g, t = generator.cfg, tokenizer.cfg
    if (g.num_scales, g.tokens_per_scale, g.codebook_size) != (t.num_scales, t.tokens_per_scale, t.codebook_size):
        raise UserValueError(f"generator models {g.num_scales}x{g.tokens_per_scale} tokens of {g.codebook_size} codes, "
                             f"tokenizer has {t.num_scales}x{t.tokens_per_scale} of {t.codebook_size}")


@torch.no_grad()
def decode(tokenizer: SpectralTokenizer, ids_BT: torch.Tensor) -> torch.Tensor:
    """Token ids of the first s scales (B, s·N) → images (B, 3, r, r) in [0, 1] at their native resolution."""
    B, T = ids_BT.shape
    N = tokenizer.cfg.tokens_per_scale
    assert T % N == 0, "a partial sequence must end on a scale boundary"
    return tokenizer.decode_indices(ids_BT.view(B, T // N, N)).clamp(0, 1)  # (B, s, N) → image


def forward_passes(num_tokens: int) -> int:
    """Transformer passes per image to sample ``num_tokens`` tokens with the KV cache: one per token
    (the class token's pass predicts the first; CFG doubles the batch, not the passes)."""
    return num_tokens


def generate(generator: ARSIT, tokenizer: SpectralTokenizer, classes_B: torch.Tensor, stop_scale: int | None,
             settings: SampleSettings, seed: int, prefix_BP: torch.Tensor | None = None,
             use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (continuing ``prefix_BP`` if given) up to the end of scale ``stop_scale`` (1-based;
    None = all) and decode: token ids (B, s·N) and images (B, 3, r, r)."""
    check_pair(generator, tokenizer)
    S, N = generator.cfg.num_scales, generator.cfg.tokens_per_scale
    s = S if stop_scale is None else stop_scale
    if not 1 <= s <= S:
        raise UserValueError(f"stop scale must be in 1..{S}, got {s}")
    if prefix_BP is not None and prefix_BP.shape[1] > s * N:
        raise UserValueError(f"the given sequences already hold {prefix_BP.shape[1] // N} scales; "
                             f"stop scale {s} would cut them (use a stop scale >= {-(-prefix_BP.shape[1] // N)})")
    gen = torch.Generator(classes_B.device).manual_seed(seed)
    ids = sample_tokens(generator, classes_B, s * N, prefix_BP, settings.guidance, settings.temperature,
                        settings.top_k, settings.top_p, gen, use_cache)
    return ids, decode(tokenizer, ids)


@torch.no_grad()
def encode_prefix(tokenizer: SpectralTokenizer, image_B3rr: torch.Tensor, keep_scales: int | None = None) -> torch.Tensor:
    """The first tokens (B, k·N) of an image (any resolution R/2^j) with a scale-causal encoder;
    ``keep_scales`` k defaults to every scale the image has."""
    if not tokenizer.cfg.causal_encoder:
        raise UserValueError("upsampling and editing need a scale-causal encoder (tokenizer.sit.causal_encoder: "
                             "true, SIT-SC or SIT-SCE)")
    _, idx_BsN, _ = tokenizer.encode(image_B3rr)
    k = idx_BsN.shape[1] if keep_scales is None else keep_scales
    if not 1 <= k <= idx_BsN.shape[1]:
        raise UserValueError(f"keep_scales must be in 1..{idx_BsN.shape[1]}, got {k}")
    return idx_BsN[:, :k].reshape(len(image_B3rr), -1)  # (B, k·N)


def upsample(generator: ARSIT, tokenizer: SpectralTokenizer, low_B3rr: torch.Tensor, classes_B: torch.Tensor,
             settings: SampleSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution images → full-resolution images whose first scales are the inputs' tokens (§5.4)."""
    return generate(generator, tokenizer, classes_B, None, settings, seed, encode_prefix(tokenizer, low_B3rr))


def edit(generator: ARSIT, tokenizer: SpectralTokenizer, image_B3RR: torch.Tensor, keep_scales: int,
         classes_B: torch.Tensor, settings: SampleSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``keep_scales`` scales of the images, regenerate the finer ones under ``classes_B`` (§5.5)."""
    return generate(generator, tokenizer, classes_B, None, settings, seed,
                    encode_prefix(tokenizer, image_B3RR, keep_scales))
