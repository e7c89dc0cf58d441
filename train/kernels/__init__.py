"""Kernels: plain-PyTorch reference ops (always available) and, behind the same functions, fast
kernels chosen automatically for CUDA tensors where they measured faster or leaner: the fused
nearest-code search (``nearest_code``), the multi-level Haar DWT and its inverse, levels fused (``haar``), and
block-causal attention through FlexAttention (``attention``). ``force_reference(True)``
(``train.kernels: reference``, set by the training loop like a ``torch.backends`` flag) makes every
op take its torch reference.
"""

from __future__ import annotations

import importlib.util

import torch

_FORCE_REFERENCE = [False]


def force_reference(on: bool) -> None:
    _FORCE_REFERENCE[0] = on


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether Triton imports; a constant to ``torch.compile`` (which would break its graph at ``find_spec``)."""
    return importlib.util.find_spec("triton") is not None


def use_kernel(*tensors) -> bool:
    """Whether the Triton kernel serves these tensors: all on CUDA, none float64, Triton importable,
    not forced to the reference."""
    return (not _FORCE_REFERENCE[0] and all(t.is_cuda and t.dtype != torch.float64 for t in tensors)
            and triton_available())
