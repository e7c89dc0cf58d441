"""Training: tokenizers, generators, kernels and Ray Train launch (see the open issues)."""
