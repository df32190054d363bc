"""Network steps retry transient failures through Prefect's retry options; nothing else is retried."""

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient
from prefect import flow

import tasks.transfer as transfer
from tasks.dpo import dpo
from tasks.sft import sft


def fast(step):
    return step.with_options(retry_delay_seconds=0, retry_jitter_factor=None)


@pytest.mark.slow  # a server or a subprocess: the full suite's tier
def test_upload_retries_transient_failures(prefect_server, tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"123")
    calls, real = [], MlflowClient.log_artifacts

    def flaky(self, run_id, local_dir, artifact_path=None):
        calls.append(run_id)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return real(self, run_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", flaky)

    @flow
    def upload(run_id: str) -> str:
        return fast(transfer.upload_artifacts)(str(tmp_path / "model"), "model", run_id)

    mlflow.set_experiment("retries")
    with mlflow.start_run() as run:
        assert upload(run.info.run_id) == f"runs:/{run.info.run_id}/model"
    assert len(calls) == 3
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model")] == ["model/weights.safetensors"]


@pytest.mark.slow  # a server or a subprocess: the full suite's tier
def test_permanent_failures_fail_at_once(prefect_server, tmp_path, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise OfflineModeIsEnabled("HF_HUB_OFFLINE=1")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)

    @flow
    def fetch() -> str:
        return fast(transfer.hub_snapshot)("org/not-here")

    with pytest.raises(OfflineModeIsEnabled):
        fetch()
    assert len(attempts) == 1

    def refused(self, run_id, local_dir, artifact_path=None):
        attempts.append(run_id)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(MlflowClient, "log_artifacts", refused)

    @flow
    def upload() -> str:
        return fast(transfer.upload_artifacts)(str(tmp_path), "x", "0" * 32)

    with pytest.raises(MlflowException):
        upload()
    assert len(attempts) == 2


def test_classification_and_training_policy():
    import requests

    response = requests.Response()
    response.status_code = 503
    assert transfer.is_transient(requests.HTTPError(response=response))
    response.status_code = 404
    assert not transfer.is_transient(requests.HTTPError(response=response))
    assert transfer.is_transient(TimeoutError())
    assert not transfer.is_transient(ValueError("bad row"))
    assert not transfer.is_transient(FileNotFoundError("outputs/model"))
    # training resumes from checkpoints instead of starting over
    assert sft.retries == 0 and dpo.retries == 0
    assert transfer.hub_snapshot.retries == transfer.upload_artifacts.retries == transfer.RETRIES
