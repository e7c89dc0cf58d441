"""Kernels: plain-PyTorch reference ops (always available) and, later, Triton versions for GPU."""
