"""Evaluation: reconstruction and generation metrics, FID/KID/IS, MLflow tracking and comparison reports."""
