"""Kernels: plain-PyTorch reference ops (always available). No Triton kernel exists yet; one would sit behind the same function."""
