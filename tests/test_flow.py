"""The whole flow on the smoke config, checked through MLflow's and Prefect's own clients."""

import hashlib
import io
import json
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from alignflow.config import validate_config
from alignflow.data.records import DataError
from alignflow.tracking.model_registry import MODEL_CODE
from flows.pipeline import align
from tasks import stages
from tests.conftest import SMOKE, run_in_session

pytestmark = pytest.mark.slow


def runs_of(experiment):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def pickled(data: bytes) -> bool:
    """Whether bytes are a pickle, whatever the file is called: a pickle stream of protocol 2-5 read through to
    its STOP opcode (pickle.dumps, cloudpickle, torch.save's legacy format), or a zip archive holding one
    (torch.save's format: <name>/data.pkl)."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(name.endswith(".pkl") or pickled(archive.read(name)) for name in archive.namelist())
    if len(data) < 2 or data[0] != pickle.PROTO[0] or not 2 <= data[1] <= 5:
        return False
    try:  # a safetensors header length can start with the same two bytes: only a whole stream counts
        return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(io.BytesIO(data)))
    except ValueError:
        return False


def stored_files(experiment_id: str, names: list[str], folder: Path) -> list[Path]:
    """Every file MLflow keeps for the experiment's runs and the registered models `names`, downloaded through
    its client into `folder`: runs/<run>/ (each run's artifacts), logged/<model>/ (MLflow 3 keeps what
    log_model writes outside the run's artifacts) and registry/<name>-<version>/ (what each version serves)."""
    client = MlflowClient()
    for run in client.search_runs([experiment_id]):
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="",
                                            dst_path=str(folder / "runs" / run.info.run_id))
    for model in client.search_logged_models([experiment_id]):
        mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                            dst_path=str(folder / "logged" / model.model_id))
    for name in names:
        for version in client.search_model_versions(f"name = '{name}'"):
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                dst_path=str(folder / "registry" / f"{name}-{version.version}"))
    return sorted(f.relative_to(folder) for f in folder.rglob("*") if f.is_file())


def pickles(folder: Path, files: list[Path]) -> list[Path]:
    from alignflow.models.loading import PICKLE_SUFFIXES

    return [f for f in files if f.suffix in PICKLE_SUFFIXES or pickled((folder / f).read_bytes())]


def test_whole_flow_records_every_stage(prefect_server, smoke_config, tmp_path):
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
    assert by_stage["sample"].data.metrics["candidates"] == 24 * smoke_config.sample.num_candidates

    # no pickle anywhere MLflow keeps this run's files, read by content: the runs' artifacts, the logged
    # models and the registered versions (the pyfunc models that carry the SFT and DPO model directories)
    experiment_id, names = parent.info.experiment_id, [f"{smoke_config.experiment}-{m}" for m in ("sft", "dpo")]
    stored = stored_files(experiment_id, names, tmp_path / "stored")
    for where in ("runs", "logged", "registry"):
        assert any(f.parts[0] == where and f.name == "model.safetensors" for f in stored), where
    assert pickles(tmp_path / "stored", stored) == []
    # the same check finds pickles under harmless names in each of the three, logged by hand as the flow logs
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    torch.save({"weight": torch.zeros(2)}, hidden / "model.safetensors")  # a zip archive holding data.pkl
    (hidden / "config.json").write_bytes(pickle.dumps({"hidden_size": 48}))
    control = mlflow.create_experiment("pickled-by-hand")
    with mlflow.start_run(experiment_id=control):
        mlflow.log_artifacts(str(hidden), "model")
        mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts={"model_dir": str(hidden)},
                                pip_requirements=["alignflow"], registered_model_name="pickled-by-hand")
    stored = stored_files(control, ["pickled-by-hand"], tmp_path / "control")
    found = pickles(tmp_path / "control", stored)
    assert sorted((f.parts[0], f.name) for f in found) == sorted(
        (where, name) for where in ("runs", "logged", "registry") for name in ("model.safetensors", "config.json")), \
        found

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
    run = run_in_session([sys.executable, "-m", "flows.cli", "run", str(SMOKE), "sft.trainer.lr=0.1"],
                         timeout=300, capture_output=True, text=True)
    assert run.returncode == 2 and "lr" in run.stderr and "SFTConfig" in run.stderr
    ok = run_in_session([sys.executable, "-m", "flows.cli", "validate", str(SMOKE)], timeout=300,
                        capture_output=True, text=True)
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
