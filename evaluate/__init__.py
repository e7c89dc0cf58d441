"""Evaluation: metrics, MLflow tracking and comparison reports (see the open issues)."""
