"""Two runs of the same config at the same time (issue 15, case 4), as two `alignflow run` processes
against real Prefect and MLflow servers, sharing one output directory and so one stage directory per
cache key. Each keyed stage is computed by one run only, while the other waits on the stage's lock and
takes the result from the cache: no stage directory has two writers."""

import json
from collections import defaultdict

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, SMOKE, start, stop_tree

pytestmark = pytest.mark.slow
SHORT = ["eval.pass_k=0", "dpo.trainer.num_train_epochs=0.5"]


def test_two_runs_at_once_compute_each_stage_once(servers_env, tmp_path):
    out = tmp_path / "shared-outputs"
    cmd = [str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={out}", "experiment=twins", *SHORT]
    logs = [tmp_path / f"run{i}.log" for i in (1, 2)]
    procs = [start(cmd, log, tmp_path, servers_env) for log in logs]
    try:
        codes = [proc.wait(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            stop_tree(proc, grace=5)  # only if one overran: nothing of either may outlive the test
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]

    client = MlflowClient(tracking_uri=servers_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("twins")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    by_key = defaultdict(list)
    for run in runs:
        if "alignflow.cache_key" in run.data.tags:
            by_key[run.data.tags["alignflow.cache_key"]].append(run)
    assert {r.data.tags["alignflow.stage"] for group in by_key.values() for r in group} >= {"sft", "sample", "dpo"}
    with_outputs = set()
    for key, group in by_key.items():
        stage = group[0].data.tags["alignflow.stage"]
        assert len(group) == 2, (stage, len(group))  # once in each flow run
        computed = [r for r in group if r.data.tags.get("alignflow.cache_hit") != "true"]
        assert len(computed) == 1, f"{stage} was computed by both runs at once"
        hit = next(r for r in group if r is not computed[0])
        assert hit.data.tags["alignflow.cache_source_run"] == computed[0].info.run_id, stage
        if "alignflow.output" in computed[0].data.tags:  # a stage whose output is a file (not evaluate's metrics)
            with_outputs.add(stage)
            assert "alignflow.output" in hit.data.tags, f"{stage}: the cache hit records no output"
            digests = [json.loads(r.data.tags["alignflow.output"])["digest"] for r in (computed[0], hit)]
            assert digests[0] == digests[1], stage  # the same output, by content
    assert with_outputs >= {"select_base", "sft", "sample", "rank", "dpo"}, with_outputs
    waited = "another run is computing this stage" in logs[0].read_text() + logs[1].read_text()
    assert waited  # the runs did meet at a stage (else the test proved nothing about the lock)
