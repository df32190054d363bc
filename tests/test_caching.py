"""Caching across flow runs: unchanged stages are reused and recorded as hits; a change reruns the
stage and what follows it, nothing before; nothing stale is served."""

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import load_config
from alignflow.pins import Uncacheable, fingerprint, model_source
from alignflow.refs import ModelRef
from flows.pipeline import align
from tasks.caching import stage_key
from tests.conftest import SMOKE

pytestmark = pytest.mark.slow
UPSTREAM = ["select_base", "sft", "sample", "rank"]


def stage_runs(parent_run_id: str) -> dict:
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.info.run_name: r for r in children}


def hit(run) -> bool:
    return run.data.tags.get("alignflow.cache_hit") == "true"


def test_key_counts_content_not_location(tmp_path):
    a = ModelRef(uri="runs:/1/model", digest="sha256:x", run_id="1", local_path="/a")
    b = ModelRef(uri="runs:/2/model", digest="sha256:x", run_id="2", local_path="/b")
    c = ModelRef(uri="runs:/1/model", digest="sha256:y", run_id="1", local_path="/a")
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    config = load_config(SMOKE)
    assert stage_key("sft", {"cfg": config.sft, "base": a}) == stage_key("sft", {"cfg": config.sft, "base": b})
    assert stage_key("sft", {"cfg": config.sft, "base": a}) != stage_key("sft", {"cfg": config.sft, "base": c})
    changed = load_config(SMOKE, ["sft.trainer.learning_rate=1e-3"]).sft
    assert stage_key("sft", {"cfg": config.sft, "base": a}) != stage_key("sft", {"cfg": changed, "base": a})
    # a local model directory counts by content; a hub id only at a pinned commit
    model = tmp_path / "m"
    model.mkdir()
    (model / "w").write_text("1")
    before = model_source(str(model))
    (model / "w").write_text("2")
    assert model_source(str(model)) != before
    assert model_source("org/model", "0123456789abcdef0123456789abcdef01234567").endswith("0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(Uncacheable, match="org/model"):
        model_source("org/model", "main")
    with pytest.raises(Uncacheable):
        fingerprint(object())


def test_rerun_reuses_unchanged_stages_and_reruns_from_the_change(prefect_server, tmp_path):
    overrides = [f"output_dir={tmp_path / 'out'}", "experiment=caching"]
    first = align(load_config(SMOKE, overrides))
    second = align(load_config(SMOKE, overrides))
    runs1, runs2 = stage_runs(first["parent_run_id"]), stage_runs(second["parent_run_id"])
    for stage in [*UPSTREAM, "dpo", "evaluate"]:
        assert not hit(runs1[stage]), stage
        assert hit(runs2[stage]), stage
        assert runs2[stage].data.tags["alignflow.cache_source_run"] == runs1[stage].info.run_id
        assert runs2[stage].data.tags["alignflow.cache_key"] == runs1[stage].data.tags["alignflow.cache_key"]
    assert not hit(runs2["load_data"])  # always reads the inputs
    # the reused evaluation's numbers are on the new parent run, and its report notes the reuse
    client = MlflowClient()
    parent1, parent2 = (client.get_run(r["parent_run_id"]).data.metrics for r in (first, second))
    assert parent2["dpo.accuracy"] == parent1["dpo.accuracy"] and parent2["sft.accuracy"] == parent1["sft.accuracy"]
    report = open(second["report"]).read()
    assert "Reused from earlier runs" in report and runs1["sft"].info.run_id in report
    assert "## Training curves" in report  # drawn from the source runs' metric histories

    # a new beta reruns DPO and what follows it, nothing before it
    third = align(load_config(SMOKE, [*overrides, "dpo.trainer.beta=0.3"]))
    runs3 = stage_runs(third["parent_run_id"])
    assert all(hit(runs3[s]) for s in UPSTREAM)
    assert not hit(runs3["dpo"]) and not hit(runs3["evaluate"])
    assert runs3["dpo"].data.params["dpo.trainer.beta"] == "0.3"

    # nothing stale: the SFT run that made the cached model is deleted -> SFT runs again; the model its
    # training left in the stage directory is unchanged (digest), so it is recorded and uploaded again, not retrained
    client.delete_run(runs1["sft"].info.run_id)
    fourth = align(load_config(SMOKE, overrides))
    runs4 = stage_runs(fourth["parent_run_id"])
    assert hit(runs4["select_base"]) and not hit(runs4["sft"])
    assert runs4["sft"].data.tags["alignflow.trained_before"].endswith("/model")
    assert runs4["sft"].data.metrics["global_step"] == runs1["sft"].data.metrics["global_step"]
    assert any(a.path == "model" for a in client.list_artifacts(runs4["sft"].info.run_id))
    # ... and with that model gone too, SFT trains again
    client.delete_run(runs4["sft"].info.run_id)
    shutil.rmtree(runs4["sft"].data.tags["alignflow.trained_before"])
    fifth = align(load_config(SMOKE, overrides))
    runs5 = stage_runs(fifth["parent_run_id"])
    assert not hit(runs5["sft"]) and runs5["sft"].data.metrics["loss"] > 0
    assert "alignflow.trained_before" not in runs5["sft"].data.tags


def test_same_path_new_content_is_a_miss(prefect_server, tmp_path, smoke_data):
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": r["prompt"][-1]["content"], "output": r["completion"][0]["content"]}
            for r in smoke_data["sft"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"output_dir={tmp_path / 'out'}", "experiment=caching-data", f"sft.data.path={data}",
                 "dpo.trainer.num_train_epochs=0.2", "eval.pass_k=0"]
    first = align(load_config(SMOKE, overrides))
    rows[0]["output"] = rows[0]["output"] + " (edited)"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # same path, new content
    second = align(load_config(SMOKE, overrides))
    runs1, runs2 = stage_runs(first["parent_run_id"]), stage_runs(second["parent_run_id"])
    assert not hit(runs2["select_base"]) and not hit(runs2["sft"])
    assert runs2["sft"].data.tags["alignflow.cache_key"] != runs1["sft"].data.tags["alignflow.cache_key"]


def test_cache_off_runs_everything(prefect_server, tmp_path):
    overrides = [f"output_dir={tmp_path / 'out'}", "experiment=caching-off", "cache=false",
                 "dpo.trainer.num_train_epochs=0.2", "eval.pass_k=0"]
    align(load_config(SMOKE, overrides))
    second = align(load_config(SMOKE, overrides))
    runs = stage_runs(second["parent_run_id"])
    assert not any(hit(r) for r in runs.values())
    assert "alignflow.cache_key" not in runs["sft"].data.tags
