"""Training: method plug-ins (``train/methods``), models, the Ray Train launch, checkpoints, tokenization."""
