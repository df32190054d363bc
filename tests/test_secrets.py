"""Secrets (issue 15, case 9): tokens given in the environment never reach MLflow (params, tags, metrics,
artifacts, the report: the whole store is searched byte by byte), Prefect's flow-run parameters or its logs
(read back through Prefect's API); a credential written into a config URL (an endpoint or a data source) is
refused before anything runs, naming the key and not the secret."""

import asyncio
import json

import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import ConfigError, load_config
from tests.conftest import SMOKE

SECRETS = {"HF_TOKEN": "hf_do-not-log-4d1c", "OPENAI_API_KEY": "sk-do-not-log-77ab",
           "MLFLOW_TRACKING_PASSWORD": "pw-do-not-log-e5"}


@pytest.mark.parametrize("override", [
    "rank.ranker={type: judge, model: m, url: 'http://user:sk-in-url-1@127.0.0.1:9/v1'}",
    "sft.data.path=https://example.invalid/sft.jsonl?token=tok-in-url-2",
    "sample.engine={type: openai, url: 'http://127.0.0.1:9/v1?api_key=key-in-url-3', model: m}",
])
def test_a_credential_in_a_config_url_is_refused_naming_the_key(override):
    with pytest.raises(ConfigError) as refused:
        load_config(SMOKE, [override])
    message = str(refused.value)
    key = override.split("=")[0]
    assert f"{key}." in message or f"{key}:" in message, message
    assert "carries a credential" in message
    assert not any(secret in message for secret in ("sk-in-url-1", "tok-in-url-2", "key-in-url-3"))


@pytest.mark.slow
def test_environment_secrets_reach_neither_mlflow_nor_prefect(prefect_server, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.pipeline import align

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    config = load_config(SMOKE, [f"output_dir={tmp_path / 'out'}", "experiment=secrets", "eval.pass_k=0",
                                 "dpo.trainer.num_train_epochs=0.5"])
    results = align(config)
    parent = MlflowClient().get_run(results["parent_run_id"])
    assert parent.info.status == "FINISHED"
    flow_run_id = parent.data.tags["prefect.flow_run_id"]

    # MLflow: the SQLite store (params, tags, metrics, inputs) and every artifact, the report among them
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "mlflow.db" for f in files) and any(f.suffix == ".safetensors" for f in files)
    assert any(f.name.startswith("report") for f in files)
    for file in files:
        data = file.read_bytes()
        leaked = [name for name, value in SECRETS.items() if value.encode() in data]
        assert not leaked, f"{file} holds {leaked}"

    async def prefect_records():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return run, logs, tasks

    run, logs, tasks = asyncio.run(prefect_records())
    assert logs and tasks  # the stages logged through Prefect
    recorded = json.dumps({"parameters": run.parameters, "logs": [log.message for log in logs],
                           "tasks": [t.model_dump(mode="json") for t in tasks]}, default=str)
    assert not [name for name, value in SECRETS.items() if value in recorded]
