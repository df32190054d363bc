"""The registered model's code (MLflow models-from-code): see alignflow.tracking.model_registry.SavedModel."""

import mlflow

from alignflow.tracking.model_registry import SavedModel

mlflow.models.set_model(SavedModel())
