"""The tracking server down mid-training (issue 15, case 1), for real: a `mlflow server` process is killed
(SIGKILL to its whole process tree: a crash, no graceful shutdown) while SFT trains.

- It comes back (started again on the same port and store once the training process has noticed): MLflow's
  own request retries are cut short here (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) so the outage outlasts them, as
  a long one would; training goes on, the metrics logged meanwhile are buffered and sent when the server is
  back (one loss value per logging step, none lost), the flow finishes, and no run is left RUNNING.
- It never comes back: once trained, the stage waits $ALIGNFLOW_TRACKING_WAIT seconds (600 by default, 3
  here) and fails with TrackingLost naming how many values, and which steps, never reached the store.

Both tests use one server (its store and port), the second killing it for good."""

import logging
import os
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from alignflow.tracking.log import TRACKING_WAIT, TrackingLost
from tests.conftest import BIN, SMOKE, free_port, start, start_mlflow, stop_tree, wait_for

pytestmark = pytest.mark.slow
LONG_SFT = ["sft.trainer.num_train_epochs=30", "sft.trainer.logging_steps=2", "sft.checkpoint_steps=0",
            "dpo.trainer.num_train_epochs=0.2", "eval.pass_k=0", "registry.enabled=false"]
CUT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class TrackingServer:
    """One `mlflow server` store and port, killed and started again by the tests."""

    def __init__(self, root):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.servers = []

    def up(self) -> str:
        if not self.servers or getattr(self.servers[-1].proc, "stopped_tree", False):
            self.servers.append(start_mlflow(self.root, self.port))  # the same port and store: the same runs
        return self.uri

    def kill(self) -> None:
        self.servers[-1].kill()

    def store(self) -> MlflowClient:
        """The server's SQLite store read directly: what reached it, readable while the server is down."""
        return MlflowClient(tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = TrackingServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    for each in server.servers:  # stopping one already stopped is a no-op
        each.stop()


def test_tracking_server_killed_mid_training_loses_no_metric(tracking, prefect_api, tmp_path):
    uri = tracking.up()
    log = tmp_path / "flow.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": uri,
           "PREFECT_HOME": str(tmp_path / "prefect_home"), **CUT_RETRIES}
    cmd = [str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={tmp_path / 'out'}", "experiment=outage",
           *LONG_SFT]
    proc = start(cmd, log, tmp_path, env)
    client = MlflowClient(tracking_uri=uri)
    try:
        def sft_logging():
            experiment = client.get_experiment_by_name("outage")
            found = experiment and client.search_runs([experiment.experiment_id], "attributes.run_name = 'sft'")
            return bool(found) and "loss" in found[0].data.metrics

        wait_for("SFT logged its first loss values", sft_logging, proc, log)
        tracking.kill()  # SIGKILL to the server's whole tree: gone mid-training, nothing shut down cleanly
        wait_for("the training process found the tracking server away",
                 lambda: "tracking server unreachable" in log.read_text(), proc, log)
        tracking.up()  # back, on the same port and store
        code = proc.wait(timeout=900)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "tracking server back after" in text

        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        assert runs and not [r for r in runs if r.info.status != "FINISHED"], [(r.info.run_name, r.info.status)
                                                                               for r in runs]
        sft = next(r for r in runs if r.info.run_name == "sft")
        steps = [m.step for m in client.get_metric_history(sft.info.run_id, "loss")]
        global_step = int(sft.data.metrics["global_step"])
        assert steps == list(range(2, global_step + 1, 2))  # every logging step's loss, none lost to the outage
    finally:
        stop_tree(proc, grace=5)


def test_tracking_server_that_never_returns_fails_the_stage_naming_what_was_lost(
        tracking, smoke_config, tiny_model_path, smoke_data, tmp_path, monkeypatch, caplog):
    """The stage trains in this process (the flow's own code path for a stage that is not launched); the server
    is killed from the trainer's first checkpoint save, so training is certain to go on without it."""
    from alignflow.tracking import RunContext
    from alignflow.training.run import CheckpointMarker
    from tasks.sft import sft
    from tests.test_stages import base_ref, dataset_ref

    uri = tracking.up()
    for key, value in {"MLFLOW_TRACKING_URI": uri, TRACKING_WAIT: "3", **CUT_RETRIES}.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(uri)
    steps = 30
    trainer = {**smoke_config.sft.trainer, "max_steps": steps, "logging_steps": 1}
    cfg = smoke_config.sft.model_copy(update={"trainer": trainer, "checkpoint_steps": 5})
    data = dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl")

    killed = {}
    saved = CheckpointMarker.on_save

    def kill_at_first_save(self, args, state, control, **kwargs):
        saved(self, args, state, control, **kwargs)
        if not killed:
            tracking.kill()
            killed.update(step=state.global_step, at=time.monotonic())

    monkeypatch.setattr(CheckpointMarker, "on_save", kill_at_first_save)
    experiment_id = mlflow.set_experiment("lost").experiment_id
    parent = mlflow.start_run(run_name="parent")
    ctx = RunContext(experiment_id=experiment_id, parent_run_id=parent.info.run_id, output_dir=str(tmp_path / "out"),
                     config_hash="test", seed=0, device="cpu")
    core = logging.getLogger("alignflow")  # Prefect's logging set-up keeps its records from the root logger
    core.addHandler(caplog.handler)
    try:
        with pytest.raises(TrackingLost) as lost:
            sft.fn(cfg, base_ref(tiny_model_path), data, ctx)
    finally:
        core.removeHandler(caplog.handler)
        while mlflow.active_run():  # the parent cannot be ended on a dead server: only taken off the stack
            try:
                mlflow.end_run("FAILED")
            except Exception:  # noqa: BLE001 - the server is gone; that is the point
                pass
    assert killed.get("step") == 5, "the server was not killed mid-training"
    waited = time.monotonic() - killed["at"]
    assert waited < 120, f"the stage waited {waited:.0f} s: {TRACKING_WAIT}=3 was not honoured"

    # what reached the store before the kill, and what the error says never did: together, every step
    store = tracking.store()
    run = store.search_runs([experiment_id], "attributes.run_name = 'sft'")[0]
    assert run.info.status == "RUNNING"  # it could not be ended; a later run on this machine closes it
    stored = sorted(m.step for m in store.get_metric_history(run.info.run_id, "loss"))
    assert stored == list(range(1, len(stored) + 1)) and len(stored) <= killed["step"]
    message = str(lost.value)
    first_lost = len(stored) + 1
    assert f"of run {run.info.run_id} (steps {first_lost}-{steps}) could not be logged" in message, message
    assert int(message.split()[0]) >= steps - len(stored)  # a loss value per lost step, at least
    assert "did not answer for 3 s after training ended" in message
    assert any("tracking server unreachable" in r.getMessage() for r in caplog.records)
