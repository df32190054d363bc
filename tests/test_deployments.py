"""Scheduled and manual runs through real Prefect deployments: a process work pool, a worker, the
`alignflow deploy` command and Prefect's own CLI, against real Prefect and MLflow servers."""

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from flows import deploy
from tests.conftest import BIN, run_in_session, start, stop_tree

pytestmark = pytest.mark.slow


def test_declared_deployments_validate_and_flags_override():
    spec = deploy.declared()
    assert spec.pipeline.cron and spec.pipeline.config == "configs/default.yaml"
    assert "dpo" in spec.stages.names and "evaluate" in spec.stages.names
    spec = deploy.declared(config="configs/smoke.yaml", overrides=["seed=3"], interval=30)
    assert spec.pipeline.cron is None and spec.pipeline.interval == 30 and spec.pipeline.overrides == ["seed=3"]
    from alignflow.config import ConfigError

    with pytest.raises(ConfigError, match="no_such_key"):
        deploy.declared(config="configs/smoke.yaml", overrides=["no_such_key=1"])


def flow_runs(api_url: str, deployment_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def pause(api_url: str, deployment_id: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        client.pause_deployment(deployment_id)


def cancel_other_runs(api_url: str, deployment_id: str, keep, timeout: float = 180) -> None:
    """After the one scheduled run the test needs: the schedule (every 10 s) made more, and the worker (limit 1)
    may have claimed the next; cancel them all and wait (bounded) until none holds the worker."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Cancelling

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deadline = time.time() + timeout
        while time.time() < deadline:
            others = [r for r in flow_runs(api_url, deployment_id) if r.id != keep and not r.state.is_final()]
            if not others:
                return
            for run in others:
                state = Cancelling() if run.state.is_running() else Cancelled()
                if not run.state.is_cancelling():
                    client.set_flow_run_state(run.id, state, force=True)
            time.sleep(2)
    pytest.fail(f"scheduled runs still not cancelled after {timeout} s")


def test_scheduled_run_on_a_worker_and_a_manual_stage_run(servers_env, tmp_path, monkeypatch):
    env = {**servers_env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    api = env["PREFECT_API_URL"]
    pool = run_in_session([str(BIN / "prefect"), "work-pool", "create", "alignflow-test", "--type", "process"],
                          timeout=180, env=env, capture_output=True, text=True)
    assert pool.returncode == 0, pool.stdout[-3000:] + pool.stderr[-3000:]
    out = tmp_path / "out"
    made = run_in_session([str(BIN / "alignflow"), "deploy", "--pool", "alignflow-test", "configs/smoke.yaml",
                           f"output_dir={out}", "experiment=scheduled", "eval.pass_k=0",
                           "dpo.trainer.num_train_epochs=0.2", "--interval", "10"],
                          timeout=300, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    ids = dict(line.split() for line in made.stdout.splitlines() if line.startswith("align"))
    pipeline_id, rank_id = ids["align/pipeline"], ids["align-stage/stage-rank"]

    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "alignflow-test", "--limit", "1"],
                   tmp_path / "worker.log", tmp_path, env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [r for r in flow_runs(api, pipeline_id) if r.state and r.state.is_final()]
            if done:
                break
            time.sleep(2)
        pause(api, pipeline_id)  # one scheduled run is enough
        assert done, (tmp_path / "worker.log").read_text()[-4000:]
        run = done[0]
        cancel_other_runs(api, pipeline_id, keep=run.id)  # the worker is free for the manual run
        assert run.state.is_completed(), (run.state, (tmp_path / "worker.log").read_text()[-4000:])
        assert run.auto_scheduled  # made by the schedule, not by hand

        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("scheduled")
        parents = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
        parent = next(r for r in parents if "mlflow.parentRunId" not in r.data.tags)
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["prefect.deployment_id"] == pipeline_id
        assert parent.data.params["eval.pass_k"] == "0"  # the deployment's overrides reached the run

        # a manual rerun of one stage through Prefect's own CLI and the per-stage deployment
        # bounded twice: Prefect's own watch timeout, and the command's (a CLI hung on the API is killed, tree and all)
        manual = run_in_session([str(BIN / "prefect"), "deployment", "run", "align-stage/stage-rank",
                                 "--params", json.dumps({"from_run": parent.info.run_id}), "--watch",
                                 "--watch-timeout", "300"], timeout=420, env=env, cwd=tmp_path, capture_output=True,
                                text=True)
        assert manual.returncode == 0, manual.stdout[-3000:] + manual.stderr[-3000:]
        reruns = client.search_runs([exp.experiment_id], f"tags.`alignflow.rerun_of` = '{parent.info.run_id}'")
        rerun_parent = next(r for r in reruns if "mlflow.parentRunId" not in r.data.tags)
        assert rerun_parent.info.status == "FINISHED"
        assert rerun_parent.data.tags["prefect.deployment_id"] == rank_id
        assert rerun_parent.data.tags["alignflow.rerun_stage"] == "rank"
        assert {r.info.run_name for r in reruns if "mlflow.parentRunId" in r.data.tags} == {"rank"}
    finally:
        stop_tree(worker)  # SIGTERM, then SIGKILL of the whole tree after a bounded wait; asserts none left


def test_serve_runs_the_schedule_from_one_process(servers_env, tmp_path, monkeypatch):
    """`alignflow serve`: no work pool, no worker; the schedule fires in the serving process."""
    declared = tmp_path / "deployments.yaml"
    declared.write_text("pipeline:\n  name: served\n  interval: 5\nstages:\n  prefix: served-\n  names: [rank]\n")
    out = tmp_path / "out"
    server = start([str(BIN / "alignflow"), "serve", "--file", str(declared), "configs/smoke.yaml",
                    f"output_dir={out}", "experiment=served", "eval.pass_k=0", "dpo.trainer.num_train_epochs=0.2"],
                   tmp_path / "serve.log", tmp_path, servers_env)
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deadline, deployment = time.time() + 300, None
        while time.time() < deadline and server.poll() is None:
            with temporary_settings({PREFECT_API_URL: servers_env["PREFECT_API_URL"]}), \
                    get_client(sync_client=True) as client:
                try:
                    deployment = client.read_deployment_by_name("align/served")
                except ObjectNotFound:  # not registered yet; any other error is the test's failure, at once
                    deployment = None
            if deployment:
                done = [r for r in flow_runs(servers_env["PREFECT_API_URL"], str(deployment.id))
                        if r.state and r.state.is_final()]
                if done:
                    break
            time.sleep(2)
        assert deployment and done, (tmp_path / "serve.log").read_text()[-4000:]
        assert done[0].state.is_completed() and done[0].auto_scheduled
        client = MlflowClient(tracking_uri=servers_env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("served")
        parent = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{done[0].id}'")
        assert parent and parent[0].info.status == "FINISHED"
        assert parent[0].data.tags["prefect.deployment_id"] == str(deployment.id)
    finally:
        stop_tree(server)
