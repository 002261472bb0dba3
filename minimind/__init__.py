"""MiniMind on Ray: a small chat LLM and its vision-language sibling, trained with Ray, tracked in MLflow."""

__version__ = "0.1.0"
