"""The whole flow on the smoke config, checked through MLflow's and Prefect's own clients."""

import hashlib
import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import validate_config
from alignflow.data.records import DataError
from flows.pipeline import align
from tasks import stages
from tests.conftest import SMOKE

pytestmark = pytest.mark.slow


def runs_of(experiment):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_whole_flow_records_every_stage(prefect_server, smoke_config):
    results = align(smoke_config)
    client = MlflowClient()
    parent = client.get_run(results["parent_run_id"])
    assert parent.info.status == "FINISHED"
    # MLflow's UI opens it in the model-training view, not as a GenAI app's evaluation runs
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    assert parent.data.tags["alignflow.config_hash"] == smoke_config.digest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=SMOKE.parent).stdout
    assert parent.data.tags["alignflow.git_commit"] == (head.strip() or "unknown")  # the code that ran
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["sft.trainer.learning_rate"] == "0.003"
    for model in ("base", "sft", "dpo"):  # the parent's columns are the per-prompt results' means
        correct = results["correct"][model]
        assert len(correct) == 24 and parent.data.metrics[f"{model}.accuracy"] == pytest.approx(sum(correct) / 24)
        assert f"{model}.mean_reward" in parent.data.metrics

    children = [r for r in runs_of(smoke_config.experiment)
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage = {r.data.tags["alignflow.stage"]: r for r in children}
    ran = {s.name for s in stages.active(smoke_config)} - {"report"}  # the report is the parent's artifact
    assert ran == {"load_data", "select_base", "sft", "sample", "rank", "dpo", "evaluate", "promote"}
    assert set(by_stage) == ran and len(children) == len(ran)
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["prefect.flow_run_id"] == flow_run_id
        assert run.data.tags["alignflow.config_hash"] == smoke_config.digest()
        assert run.data.params, stage
        assert run.inputs.dataset_inputs, f"{stage} logged no input dataset"
        assert all(d.dataset.digest for d in run.inputs.dataset_inputs)

    def artifacts(stage):
        return {a.path for a in client.list_artifacts(by_stage[stage].info.run_id)}

    assert "candidates.json" in artifacts("select_base")
    assert "model" in artifacts("sft") and "model" in artifacts("dpo")
    assert {"candidates.jsonl", "candidates_table.json"} <= artifacts("sample")
    assert {"pairs.jsonl", "pairs_table.json"} <= artifacts("rank")
    assert {"eval_samples.json", "eval_results.json"} <= artifacts("evaluate")
    sft_files = {a.path for a in client.list_artifacts(by_stage["sft"].info.run_id, "model")}
    assert {"model/model.safetensors", "model/tokenizer.json", "model/chat_template.jinja"} <= sft_files
    assert "loss" in by_stage["sft"].data.metrics and "loss" not in parent.data.metrics
    assert "rewards/margins" in by_stage["dpo"].data.metrics
    from alignflow.models.loading import PICKLE_SUFFIXES
    from tests.test_stages import artifact_paths

    logged = [path for run in children for path in artifact_paths(run.info.run_id)]
    assert any(path.endswith("model.safetensors") for path in logged)
    assert not [path for path in logged if path.endswith(PICKLE_SUFFIXES)]  # no pickle in any logged model
    assert by_stage["sample"].data.metrics["candidates"] == 24 * smoke_config.sample.num_candidates

    from prefect import get_client

    async def state():
        async with get_client() as prefect:
            return (await prefect.read_flow_run(flow_run_id)).state.type.value

    import asyncio

    assert asyncio.run(state()) == "COMPLETED"


def test_users_own_files_run_through_the_whole_flow(prefect_server, smoke_config, smoke_data, tmp_path):
    """Alpaca JSON for SFT, messages JSONL for prompts, prompt/completion Parquet for eval: config only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def alpaca(row):
        instruction, _, extra = row["prompt"][0]["content"].partition("\n\n")
        return {"instruction": instruction, "input": extra, "output": row["completion"][0]["content"]}

    (tmp_path / "sft.json").write_text(json.dumps([alpaca(r) for r in smoke_data["sft"]]))
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for r in smoke_data["prompts"][:12]:
            f.write(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"][0]["content"],
                                          "completion": r["completion"][0]["content"]}
                                         for r in smoke_data["eval"][:12]]), tmp_path / "eval.parquet")
    tree = smoke_config.model_dump()
    tree["experiment"] = "own-files"
    tree["sft"]["data"] = {"path": str(tmp_path / "sft.json")}
    tree["sample"]["prompts"] = {"path": str(tmp_path / "prompts.jsonl")}
    tree["eval"]["data"] = {"path": str(tmp_path / "eval.parquet")}
    config = validate_config(tree)
    results = align(config)
    assert set(results["metrics"]) == {"base", "sft", "dpo"}
    assert MlflowClient().get_run(results["parent_run_id"]).info.status == "FINISHED"


def test_bad_input_fails_before_any_model_loads(prefect_server, smoke_config, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n')
    before = hashlib.sha256(bad.read_bytes()).hexdigest()
    config = smoke_config.model_copy(update={
        "experiment": "bad-input",
        "sft": smoke_config.sft.model_copy(update={"data": type(smoke_config.sft.data)(path=str(bad))})})
    with pytest.raises(DataError, match=r"sft.jsonl: row 2: field 'output': expected a string"):
        align(config)
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == before
    runs = runs_of("bad-input")
    assert {r.data.tags.get("alignflow.stage", "parent") for r in runs} == {"parent", "load_data"}
    assert all(r.info.status == "FAILED" for r in runs)


def test_cli_reports_bad_config_key_and_validates(tmp_path):
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(SMOKE), "sft.trainer.lr=0.1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "lr" in run.stderr and "SFTConfig" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(SMOKE)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout


def test_bad_trainer_value_fails_before_any_model_loads(prefect_server, smoke_config):
    from alignflow.config import ConfigError

    tree = smoke_config.model_dump()
    tree["experiment"] = "bad-value"
    tree["dpo"]["trainer"]["loss_weights"] = [1.0, 2.0]  # one weight per loss_type: TRL rejects it
    with pytest.raises(ConfigError, match="dpo.trainer"):
        align(validate_config(tree))
    runs = runs_of("bad-value")
    assert {r.data.tags.get("alignflow.stage", "parent") for r in runs} == {"parent", "load_data"}
    assert all(r.info.status == "FAILED" for r in runs)
