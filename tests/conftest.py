"""Shared fixtures: offline, isolated stores, the smoke config's tiny models built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: the tests build their models
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session", autouse=True)
def alignflow_home(tmp_path_factory):
    """Embedded data and models are built into a fresh cache for the test session."""
    home = tmp_path_factory.mktemp("alignflow_home")
    os.environ["ALIGNFLOW_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """Each test gets its own SQLite tracking store and working directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run("FAILED")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def smoke_config(tmp_path):
    from alignflow.config import load_config

    return load_config(SMOKE, [f"output_dir={tmp_path / 'outputs'}"])


@pytest.fixture(scope="session")
def tiny_model_path(alignflow_home) -> str:
    from alignflow import embedded
    from alignflow.config import load_config

    return embedded.model_path(load_config(SMOKE).embedded, "embedded:tiny-s")


@pytest.fixture(scope="session")
def smoke_data(alignflow_home) -> dict[str, list[dict]]:
    from alignflow import embedded
    from alignflow.config import load_config
    from alignflow.data import load_rows

    spec = load_config(SMOKE).embedded
    return {split: load_rows(embedded.data_path(spec, f"embedded:{split}")) for split in embedded.SPLITS}


@pytest.fixture
def run_ctx(tmp_path, mlflow_store):
    """A real MLflow parent run for stage tests, as the flow would open it."""
    from alignflow.tracking import RunContext

    experiment_id = mlflow.set_experiment("stage-tests").experiment_id
    with mlflow.start_run(run_name="parent") as parent:
        yield RunContext(experiment_id=experiment_id, parent_run_id=parent.info.run_id,
                         output_dir=str(tmp_path / "out"), config_hash="test", seed=0, device="cpu")
