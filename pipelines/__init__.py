"""Entry points: the ``c2f`` CLI and (later) Prefect flows. Nothing imports this package."""
