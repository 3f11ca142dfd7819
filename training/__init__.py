"""Models, evaluation, MLflow tracking and the registry (imports features, never serving)."""
