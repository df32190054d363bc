"""The tracking server down mid-training (issue 15, case 1), for real: a `mlflow server` process is killed
while `alignflow run` trains SFT, and started again on the same port and store once the training process
has noticed. MLflow's own request retries are cut short here (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) so the
outage outlasts them, as a long one would: training goes on, the metrics logged meanwhile are buffered
and sent when the server is back (one loss value per logging step, none lost), the flow finishes, and
no run is left RUNNING."""

import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, SMOKE, free_port, start_mlflow, stop_tree

pytestmark = pytest.mark.slow
LONG_SFT = ["sft.trainer.num_train_epochs=30", "sft.trainer.logging_steps=2", "sft.checkpoint_steps=0",
            "dpo.trainer.num_train_epochs=0.2", "eval.pass_k=0", "registry.enabled=false"]


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 300, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the flow ended (exit code {proc.returncode}) before {what}")
        if condition():
            return
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_tracking_server_killed_mid_training_loses_no_metric(prefect_api, tmp_path):
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    servers = [start_mlflow(root, port)]
    log = tmp_path / "flow.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": uri,
           "PREFECT_HOME": str(tmp_path / "prefect_home"), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    cmd = [str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={tmp_path / 'out'}", "experiment=outage",
           *LONG_SFT]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = MlflowClient(tracking_uri=uri)
    try:
        def sft_logging():
            experiment = client.get_experiment_by_name("outage")
            found = experiment and client.search_runs([experiment.experiment_id], "attributes.run_name = 'sft'")
            return bool(found) and "loss" in found[0].data.metrics

        wait_until(sft_logging, proc, "SFT logged its first loss values")
        servers[0].stop()  # SIGTERM, then SIGKILL of its process group: the server is gone mid-training
        wait_until(lambda: "tracking server unreachable" in log.read_text(), proc,
                   "the training process found the tracking server away")
        servers.append(start_mlflow(root, port))  # back, on the same port and store
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
        for server in servers:  # stopping one already stopped is a no-op
            server.stop()
