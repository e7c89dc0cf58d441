"""Entry points and orchestration: the ``c2f`` CLI, the Prefect flow ``full-pipeline``, stages, MLflow run bookkeeping."""
