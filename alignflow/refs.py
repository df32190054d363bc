"""The stage contract: a stage returns a small reference to its output, never a model or tensor.

A reference says where the output lives (a local path and/or an MLflow artifact URI), what its
content digest is, and which MLflow run made it, so a later stage, or a rerun of one stage alone,
can find it and check it is the same content.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel


class DigestMismatch(RuntimeError):
    pass


def digest_path(path: str | Path) -> str:
    """sha256 over a file, or over a directory's relative paths and file contents in sorted order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


class ArtifactRef(BaseModel):
    kind: Literal["model", "dataset"]
    uri: str  # MLflow artifact URI (runs:/<id>/<path>), a local path, or a hub id (base models)
    digest: str  # sha256 of the content, or a hub commit for hub models
    run_id: str | None = None  # the MLflow run that made it
    local_path: str | None = None  # where this machine already has it
    # fingerprint of the chat template a model renders with, or that a dataset's answers were sampled
    # under (alignflow.models.templates.template_fingerprint); stages check it before loading weights
    chat_template: str | None = None

    def resolve(self) -> str:
        """A local path with this content: the known local copy if intact, else downloaded from MLflow."""
        if self.local_path and Path(self.local_path).exists() and digest_path(self.local_path) == self.digest:
            return self.local_path
        if self.uri.startswith(("runs:/", "mlflow-artifacts:", "models:/")):
            import mlflow

            path = mlflow.artifacts.download_artifacts(artifact_uri=self.uri)
            if digest_path(path) != self.digest:
                raise DigestMismatch(f"{self.uri}: content digest differs from the one recorded ({self.digest})")
            return path
        return self.uri  # a local directory given by the user, or a hub id


class ModelRef(ArtifactRef):
    kind: Literal["model"] = "model"
    # the model's code may come from its repository: set by `base.trust_remote_code` on the chosen base
    # and carried to every model trained from it, so each stage that loads one honours it
    trust_remote_code: bool = False


class DatasetRef(ArtifactRef):
    kind: Literal["dataset"] = "dataset"


def parse_ref(value: dict) -> ArtifactRef:
    """A recorded reference (`alignflow.output` JSON) as a ModelRef or DatasetRef, by its kind."""
    return (ModelRef if value.get("kind") == "model" else DatasetRef).model_validate(value)
