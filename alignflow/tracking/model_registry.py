"""The MLflow Model Registry: SFT and DPO models as pyfunc models that carry the saved model
directory (weights or adapter, tokenizer, chat template), and the champion/challenger decision.

`mlflow.transformers.log_model` needs torchvision with transformers 5, which does not import beside
the CPU torch, so models are logged as `mlflow.pyfunc` models from code (alignflow/tracking/model_registry_code.py,
no pickled objects): `mlflow.pyfunc.load_model("models:/<name>@champion").predict(["instruction"])`
answers with greedy decoding, and the directory itself is the `model_dir` artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from alignflow.refs import ModelRef

MODEL_CODE = Path(__file__).with_name("model_registry_code.py")


class SavedModel(mlflow.pyfunc.PythonModel):
    """Instructions in (a list of strings or a DataFrame with an `instruction` column), answers out."""

    def load_context(self, context):
        from alignflow.models.loading import load_causal_lm, load_tokenizer, pick_device

        self.device = pick_device("auto")
        path = context.artifacts["model_dir"]
        self.model, self.tokenizer = load_causal_lm(path, self.device), load_tokenizer(path)

    # a DataFrame hint: MLflow infers no schema from it, so inputs pass as they come (a list too), unvalidated
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from alignflow.models.generate import generate

        instructions = list(model_input["instruction"]) if hasattr(model_input, "columns") else list(model_input)
        prompts = [[{"role": "user", "content": text}] for text in instructions]
        outputs = generate(self.model, self.tokenizer, prompts, max_new_tokens=(params or {}).get("max_new_tokens", 64))
        return [o[0]["text"] for o in outputs]


def register_model(ref: ModelRef, name: str, flow_run_id: str) -> ModelVersion:
    """The registry version holding this content: an existing one with the same digest (a cached stage
    registers nothing new), else a new version logged into the active (promote) run."""
    client = MlflowClient()
    try:
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("alignflow.digest") == ref.digest:
                return version
    except MlflowException:
        pass
    info = mlflow.pyfunc.log_model(name=name, python_model=str(MODEL_CODE), artifacts={"model_dir": ref.resolve()},
                                   pip_requirements=["alignflow"], registered_model_name=name)
    version = client.get_model_version(name, str(info.registered_model_version))
    for key, value in {"alignflow.digest": ref.digest, "alignflow.stage_run": ref.run_id or "",
                       "alignflow.flow_run": flow_run_id, "alignflow.uri": ref.uri}.items():
        client.set_model_version_tag(name, version.version, key, value)
    return client.get_model_version(name, version.version)


def alias_version(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_model_dir(version: ModelVersion) -> str:
    """A local copy of a registered version's saved model directory."""
    from mlflow.models import Model

    path = mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}")
    artifacts = Model.load(path).flavors["python_function"]["artifacts"]
    return str(Path(path) / artifacts["model_dir"]["path"])
