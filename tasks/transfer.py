"""The steps that cross a network, as Prefect tasks that retry with exponential backoff: fetching a
model from the Hugging Face hub (base candidates, reward models) and uploading artifacts to MLflow.

Only transient failures are retried (connection errors, timeouts, HTTP 429/5xx); a missing
repository, offline mode or a bad request fails at once. Training tasks are not retried: a
rerun resumes them from their last complete checkpoint (alignflow.training.run).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

RETRIES = 4  # 5 attempts, ~2, 4, 8, 16 s apart (+-50% jitter)
WEIGHT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # never pickles
CODE_FILES = ["*.py"]  # only with trust_remote_code


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the server hiccuped, not the request."""
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(exc, (OfflineModeIsEnabled, RepositoryNotFoundError, LocalEntryNotFoundError)):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):  # MLflow wraps HTTP failures; 4xx codes are the caller's fault
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError))


def retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classify whatever the attempt raised
        return is_transient(exc)
    return False


RETRY = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
             retry_condition_fn=retry_transient, cache_policy=NONE)


@task(name="hub-download", **RETRY)
def hub_snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> str:
    """A local directory with the repo's files (safetensors weights, configs, tokenizer), downloaded
    once into the Hugging Face cache; the token, if any, comes from the environment (HF_TOKEN)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns or WEIGHT_FILES)


@task(name="mlflow-upload", **RETRY)
def upload_artifacts(local_dir: str, artifact_path: str, run_id: str) -> str:
    """Log a directory's files to a run's artifacts; returns the runs:/ URI."""
    from mlflow.tracking import MlflowClient

    MlflowClient().log_artifacts(run_id, local_dir, artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def call(step, *args, **kwargs):
    """Run a transfer task with Prefect's retries inside a flow; a stage called directly (tests,
    notebooks) runs it once, without standing up a Prefect server for it."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        return step(*args, **kwargs)
    return step.fn(*args, **kwargs)


def local_model(name: str, revision: str | None = None) -> str:
    """A model given as a local directory or a hub id, as a local directory (hub ids fetched with retries)."""
    if Path(name).exists():
        return name
    return call(hub_snapshot, name, revision)
