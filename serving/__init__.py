"""The BentoML twin service, its store, API and auth (imports features and training)."""
