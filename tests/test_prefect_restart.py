"""The Prefect server restarted mid-run (issue 15, case 3), for real: `prefect server start` is killed (SIGKILL to
its tree) while `alignflow run` trains SFT and started again on the same port and database.

Prefect 3 orchestrates task runs in the flow's own process (their states travel as events): a stage needs the
server only when it starts (its MLflow run's tags read the flow run's deployment from the API), and the flow
for its final state. So

- a restart while SFT trains: training carries on, and the restarted server records SFT's completion;
- an outage that outlasts the client's retries (PREFECT_CLIENT_MAX_RETRIES, cut to 1 here as the tracking
  outage test cuts MLflow's) when the next stage starts fails that stage and the flow: the MLflow parent run
  FAILED, every stage run before it FINISHED, a non-zero exit. The end never reached Prefect, whose record of
  the flow run stays Running (not Crashed: it could not be told);
- the rerun completes, taking every stage the first run finished from the cache, and no MLflow run is left
  RUNNING."""

import os
import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, SMOKE, free_port, start, start_prefect, stop_tree, wait_for

pytestmark = pytest.mark.slow
LONG_SFT = ["sft.trainer.num_train_epochs=20", "sft.checkpoint_steps=25", "dpo.trainer.num_train_epochs=0.2",
            "eval.pass_k=0", "registry.enabled=false"]
FLOW_ENDED = re.compile(r"Flow run '[^']+' - Finished in state")  # the engine's last word, reported or not


def prefect_state(api: str, flow_run_id: str):
    """(the flow run's state type, {task run name: state type}) as the Prefect server records them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return flow_run.state.type.value, {t.name.rsplit("-", 1)[0]: t.state_type.value for t in tasks if t.state_type}


def test_prefect_server_restarted_mid_run_then_the_rerun_uses_the_cache(mlflow_server, tmp_path):
    root, port = tmp_path / "prefect", free_port()
    root.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    servers = [start_prefect(root, port)]
    env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_server,
           "PREFECT_HOME": str(tmp_path / "prefect_home")}
    cmd = [str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={tmp_path / 'out'}", "experiment=restart",
           *LONG_SFT]
    client = MlflowClient(tracking_uri=mlflow_server)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def sft_runs():
        experiment = client.get_experiment_by_name("restart")
        return client.search_runs([experiment.experiment_id], "attributes.run_name = 'sft'") if experiment else []

    first = second = None
    try:
        first = start(cmd, logs[0], tmp_path, {**env, "PREFECT_CLIENT_MAX_RETRIES": "1"})
        wait_for("SFT training (a complete checkpoint)", lambda: list((tmp_path / "out").glob(
            "stages/sft-*/trainer/checkpoint-*/alignflow-complete.json")) and sft_runs(), first, logs[0], timeout=900)
        sft_run = sft_runs()[0].info.run_id
        servers[-1].kill()
        servers.append(start_prefect(root, port))  # the same port and database
        # the restart happened while SFT trained: it is still running now that the server is back
        assert first.poll() is None, logs[0].read_text()[-3000:]
        assert client.get_run(sft_run).info.status == "RUNNING"
        assert not list((tmp_path / "out").glob("stages/sft-*/model"))
        flow_run_id = client.get_run(client.get_run(sft_run).data.tags["mlflow.parentRunId"]).data.tags[
            "prefect.flow_run_id"]
        # training carried on, and the restarted server recorded SFT's end
        wait_for("SFT's completion recorded by the restarted Prefect server",
                 lambda: prefect_state(api, flow_run_id)[1].get("sft") == "COMPLETED", first, logs[0], timeout=900)

        servers[-1].kill()  # and now away for longer than the flow's client retries
        wait_for("the flow failing to reach the Prefect server", lambda: FLOW_ENDED.search(logs[0].read_text()),
                 first, logs[0], timeout=900, every=0.2)
        servers.append(start_prefect(root, port))  # back for the rerun (the first run's events drain to it)
        first_code = first.wait(timeout=300)

        second = start(cmd, logs[1], tmp_path, env)
        assert second.wait(timeout=900) == 0, logs[1].read_text()[-3000:]
        states = [prefect_state(api, flow_run_id)]
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_tree(proc, grace=5)
        for server in servers:  # a server already killed is not signalled again
            server.stop()

    first_log = logs[0].read_text()
    assert first_code != 0 and "ConnectError" in first_log, first_log[-3000:]
    experiment = client.get_experiment_by_name("restart")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]
    assert parents[0].data.tags["prefect.flow_run_id"] == flow_run_id
    assert states[0][0] == "RUNNING"  # Prefect never heard the first run end (nor Crashed: it could not be told)

    def stages(parent):
        return {r.data.tags["alignflow.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}

    before, after = stages(parents[0]), stages(parents[1])
    # the stage that met the outage failed as it started, asking Prefect for the run's deployment: it opened
    # no MLflow run; every stage before it FINISHED
    failed = re.findall(r"Task run '(\w+)-\w+' - Finished in state Failed", first_log)
    assert len(failed) == 1 and failed[0] not in before and failed[0] in after, (failed, sorted(before))
    assert {r.info.status for r in before.values()} == {"FINISHED"}
    finished = {s for s, r in before.items() if "alignflow.cache_key" in r.data.tags}
    assert finished >= {"select_base", "sft"}, finished
    for stage in finished:  # not trained or computed again
        assert after[stage].data.tags.get("alignflow.cache_hit") == "true", stage
    assert after[failed[0]].data.tags.get("alignflow.cache_hit") != "true"  # computed by the rerun
