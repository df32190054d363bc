"""The registered model's code (MLflow models-from-code): see alignflow.registry.SavedModel."""

import mlflow

from alignflow.registry import SavedModel

mlflow.models.set_model(SavedModel())
