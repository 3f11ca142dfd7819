"""Entry point of the logged model ("models from code"): MLflow runs this file on load,
with the bundled ``features``/``training`` code on the path."""

import mlflow

from training.package import TwincastModel

mlflow.models.set_model(TwincastModel())
