"""Kernels: plain-PyTorch reference ops (always available) and, behind the same functions, Triton
kernels chosen automatically on CUDA (``nearest_code``; the Haar DWT and block-causal attention
still run their torch references everywhere)."""
