"""Resume and termination, for real: flows run as `alignflow run` processes against real Prefect and
MLflow servers, and are killed with SIGKILL / SIGTERM mid-training. The resumed run is checked by what it
trained (its logged steps), not only by the tag it carries."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alignflow.training.run import COMPLETE_MARKER, last_complete_checkpoint
from tests.conftest import BIN, SMOKE, start, stop_tree

pytestmark = pytest.mark.slow
# SFT long enough to be killed in the middle (8 epochs of the smoke data: 120 steps), a checkpoint every 25 steps:
# the flow is killed as soon as the first complete one appears, 95 steps before the end
LONG_SFT = ["sft.trainer.num_train_epochs=8", "sft.checkpoint_steps=25", "dpo.trainer.num_train_epochs=0.2",
            "eval.pass_k=0"]


def test_only_complete_checkpoints_are_resumed_from(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if complete:
            (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / COMPLETE_MARKER).write_text("{trunc")  # killed while writing the marker
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert last_complete_checkpoint(tmp_path / "nothing") is None


def start_flow(out: Path, experiment: str, env: dict) -> subprocess.Popen:
    cmd = [str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={out}", f"experiment={experiment}", *LONG_SFT]
    return start(cmd, out.parent / f"{experiment}.log", out.parent, env)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 600) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = list(out.glob(f"stages/sft-*/trainer/checkpoint-*/{COMPLETE_MARKER}"))
        if done:
            return done[0].parent
        time.sleep(0.1)
    stop_tree(proc)
    pytest.fail(f"no complete SFT checkpoint appeared (exit code {proc.poll()})")


def runs(experiment: str):
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_sigkill_mid_training_then_rerun_resumes_to_the_same_step(servers_env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_flow(out, "resume", servers_env)
    checkpoint = wait_for_checkpoint(proc, out)
    os.kill(proc.pid, signal.SIGKILL)  # the flow's process alone, as the OOM killer would
    proc.wait(timeout=60)
    stop_tree(proc)  # nothing it started may live on
    # the step an uninterrupted run ends at, as the killed run's trainer planned it (trainer_state.json)
    plans = {json.loads((c / "trainer_state.json").read_text())["max_steps"]
             for c in checkpoint.parent.glob("checkpoint-*") if (c / COMPLETE_MARKER).is_file()}
    assert len(plans) == 1
    planned = plans.pop()
    # a checkpoint killed while being written: a directory without the marker, numbered beyond the last
    half = checkpoint.parent / "checkpoint-100000"
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 100')

    rerun = start_flow(out, "resume", servers_env)
    try:
        assert rerun.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        stop_tree(rerun, grace=5)  # only if it overran: nothing of it may outlive the test

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers_env["MLFLOW_TRACKING_URI"])
    all_runs = runs("resume")
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    sft_runs = sorted((r for r in all_runs if r.info.run_name == "sft"), key=lambda r: r.info.start_time)
    killed, resumed = sft_runs
    assert killed.info.status == "KILLED" and "alignflow.closed" in killed.data.tags
    assert resumed.info.status == "FINISHED"
    resumed_from = resumed.data.tags["alignflow.resumed_from"]
    assert resumed_from.startswith("checkpoint-") and resumed_from != half.name
    step = int(resumed_from.split("-")[1])
    assert step >= int(checkpoint.name.split("-")[1])
    assert resumed.data.tags["alignflow.cache_key"] == killed.data.tags["alignflow.cache_key"]
    # trained on from the checkpoint, not again from step 0: the resumed run's first logged step comes after
    # the checkpoint's, and it trained only the steps left (one loss value every 5 steps, the logging interval)
    client = MlflowClient(tracking_uri=servers_env["MLFLOW_TRACKING_URI"])
    logged = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "loss"))
    assert logged == list(range(step + 5, planned + 1, 5)), (step, planned, logged)
    # and it ends where the uninterrupted run was heading
    assert resumed.data.metrics["global_step"] == planned > step >= 25


def test_sigterm_leaves_no_run_running(servers_env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_flow(out, "terminated", servers_env)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)  # `kill PID`: the flow's process, not its group
    try:
        code = proc.wait(timeout=120)
    finally:
        stop_tree(proc, grace=5)
    assert code != 0, (tmp_path / "terminated.log").read_text()[-3000:]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers_env["MLFLOW_TRACKING_URI"])
    all_runs = runs("terminated")
    parent = next(r for r in all_runs if "mlflow.parentRunId" not in r.data.tags)
    statuses = {r.info.run_name: r.info.status for r in all_runs if r is not parent}
    # every open MLflow run FAILED (the parent and SFT, the stage it was in); the stages before it FINISHED
    assert parent.info.status == "FAILED"
    assert statuses == {"load_data": "FINISHED", "select_base": "FINISHED", "sft": "FAILED"}, statuses

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: servers_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(parent.data.tags["prefect.flow_run_id"]).state
    assert state.type.value == "CRASHED", state
