"""The Prefect server restarted mid-run (issue 15, case 3), for real: `prefect server start` is stopped
while `alignflow run` trains SFT and started again on the same port and database. The flow either carries
on or ends with a clear failure; either way the rerun completes, taking every stage the first run finished
from the cache instead of training it again, and no MLflow run is left RUNNING."""

import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, SMOKE, free_port, start_prefect, stop_tree

pytestmark = pytest.mark.slow
LONG_SFT = ["sft.trainer.num_train_epochs=20", "sft.checkpoint_steps=25", "dpo.trainer.num_train_epochs=0.2",
            "eval.pass_k=0", "registry.enabled=false"]


def test_prefect_server_restarted_mid_run_then_the_rerun_uses_the_cache(mlflow_server, tmp_path):
    root, port = tmp_path / "prefect", free_port()
    root.mkdir()
    servers = [start_prefect(root, port)]
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "MLFLOW_TRACKING_URI": mlflow_server,
           "PREFECT_HOME": str(tmp_path / "prefect_home")}
    cmd = [str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={tmp_path / 'out'}", "experiment=restart",
           *LONG_SFT]
    client = MlflowClient(tracking_uri=mlflow_server)
    first = second = None
    try:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / "first.log", "w"),
                                 stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not list((tmp_path / "out").glob("stages/sft-*/trainer/checkpoint-*")):  # SFT is training
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        servers[0].stop()
        servers.append(start_prefect(root, port))  # the same port and database
        first_code = first.wait(timeout=900)
        second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / "second.log", "w"),
                                  stderr=subprocess.STDOUT)
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_tree(proc, grace=5)
        for server in servers:
            server.stop()

    experiment = client.get_experiment_by_name("restart")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and parents[1].info.status == "FINISHED"
    assert parents[0].info.status == ("FINISHED" if first_code == 0 else parents[0].info.status)

    def stages(parent):
        return {r.data.tags["alignflow.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}

    before, after = stages(parents[0]), stages(parents[1])
    finished = [s for s, r in before.items() if r.info.status == "FINISHED" and "alignflow.cache_key" in r.data.tags]
    assert "select_base" in finished  # it finished before the server went away
    for stage in finished:  # not trained or computed again
        assert after[stage].data.tags.get("alignflow.cache_hit") == "true", stage
    if "sft" not in finished:  # the first run did not get to record SFT: the rerun resumed or reused it
        sft = after["sft"].data.tags
        assert "alignflow.resumed_from" in sft or "alignflow.trained_before" in sft or sft.get(
            "alignflow.cache_hit") == "true", sft
