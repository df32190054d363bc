"""`alignflow stage NAME --from-run RUN_ID`: one stage rerun on an earlier flow run's recorded outputs."""

import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import load_config
from alignflow.refs import DigestMismatch
from flows.cli import main
from flows.pipeline import align
from flows.stage import align_stage
from tests.conftest import SMOKE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    """One tracking store and working directory for the module: its tests share one source flow run."""
    root = tmp_path_factory.mktemp("reruns")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        yield root, uri


@pytest.fixture
def mlflow_store(module_store):  # in place of conftest's per-test store
    mlflow.set_tracking_uri(module_store[1])
    yield module_store[1]
    while mlflow.active_run():
        mlflow.end_run("FAILED")


@pytest.fixture(scope="module")
def source_run(prefect_server, module_store):
    mlflow.set_tracking_uri(module_store[1])
    return align(load_config(SMOKE, [f"output_dir={module_store[0] / 'out'}", "experiment=reruns", "eval.pass_k=0"]))


def children(parent_run_id: str) -> dict:
    client = MlflowClient()
    exp = client.get_run(parent_run_id).info.experiment_id
    return {r.info.run_name: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")}


def snapshot(run_id: str) -> tuple:
    run = MlflowClient().get_run(run_id)
    return run.info.status, run.info.end_time, dict(run.data.params), dict(run.data.metrics)


def test_rerun_dpo_then_evaluate_from_the_rerun(source_run):
    client = MlflowClient()
    source_id = source_run["parent_run_id"]
    source_stages = children(source_id)
    before = {name: snapshot(r.info.run_id) for name, r in source_stages.items()} | {"parent": snapshot(source_id)}

    rerun = align_stage("dpo", source_id, overrides=["dpo.trainer.beta=0.3"])
    parent = client.get_run(rerun["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["alignflow.rerun_of"] == source_id and parent.data.tags["alignflow.rerun_stage"] == "dpo"
    assert parent.data.params["dpo.trainer.beta"] == "0.3"
    stages = children(rerun["parent_run_id"])
    assert set(stages) == {"dpo"}
    dpo_run = stages["dpo"]
    assert dpo_run.data.tags["alignflow.rerun_of"] == source_id
    assert dpo_run.data.tags["alignflow.cache_hit"] == "false"  # beta changed: trained again
    assert dpo_run.data.params["dpo.policy"] == source_stages["sft"].data.tags["alignflow.output"].split('"uri":"')[1].split('"')[0]
    assert "rewards/margins" in dpo_run.data.metrics
    # the source runs are only read
    after = {name: snapshot(r.info.run_id) for name, r in source_stages.items()} | {"parent": snapshot(source_id)}
    assert after == before

    # evaluate from the rerun: the new DPO model beside the source's base and SFT models
    assert main(["stage", "evaluate", "--from-run", rerun["parent_run_id"]]) == 0
    evals = client.search_runs([parent.info.experiment_id], f"tags.alignflow.rerun_of = '{rerun['parent_run_id']}'")
    eval_parent = next(r for r in evals if "mlflow.parentRunId" not in r.data.tags)
    assert eval_parent.data.params["dpo.trainer.beta"] == "0.3"  # the rerun's config, carried along
    eval_run = children(eval_parent.info.run_id)["evaluate"]
    assert eval_run.data.params["eval.model.dpo"] == rerun["output"]["uri"]
    assert eval_run.data.params["eval.model.sft"] == source_run_uri(source_stages["sft"])
    import mlflow

    evaluated = mlflow.artifacts.load_dict(f"runs:/{eval_run.info.run_id}/eval_results.json")
    assert set(evaluated["correct"]) == {"base", "sft", "dpo"}
    for model, correct in evaluated["correct"].items():  # the rerun's columns are its own per-prompt results
        assert eval_parent.data.metrics[f"{model}.accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert any(a.path == "report" for a in client.list_artifacts(eval_parent.info.run_id))


def source_run_uri(run) -> str:
    import json

    return json.loads(run.data.tags["alignflow.output"])["uri"]


def test_rerun_names_what_is_missing(source_run, capsys):
    assert main(["stage", "sft", "--from-run", source_run["parent_run_id"], "sft.trainer.no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert main(["stage", "dpo", "--from-run", "0" * 32]) == 2


# last: it alters the shared source run's stored SFT model
def test_rerun_checks_digests_before_loading_and_leaves_no_run(source_run, capsys):
    client = MlflowClient()
    source_id = source_run["parent_run_id"]
    sft_run = children(source_id)["sft"]
    # the artifact store's copy of the SFT model is altered and the local copy is gone
    local = Path(source_run_uri_local(sft_run))
    shutil.rmtree(local)
    stored = Path(urlparse(sft_run.info.artifact_uri).path) / "model" / "config.json"
    stored.write_text(stored.read_text().replace("{", '{"tampered": true, ', 1))
    n_runs = len(client.search_runs([sft_run.info.experiment_id]))
    with pytest.raises(DigestMismatch, match="digest"):
        align_stage("sample", source_id)
    assert len(client.search_runs([sft_run.info.experiment_id])) == n_runs  # no run opened, none "successful"
    assert main(["stage", "sample", "--from-run", source_id]) == 2
    assert "digest" in capsys.readouterr().err


def source_run_uri_local(run) -> str:
    import json

    return json.loads(run.data.tags["alignflow.output"])["local_path"]
