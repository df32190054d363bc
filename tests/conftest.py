"""Shared fixtures: offline, isolated stores, the smoke config's tiny models built once per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

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


BIN = Path(sys.executable).parent  # the venv's console scripts: prefect, mlflow, alignflow
QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback, started in its own process group and stopped with it."""

    def __init__(self, name: str, cmd: list[str], health: str, root: Path, env: dict | None = None,
                 timeout: float = 120):
        self.name, self.root, self.log_path = name, root, root / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=root,
                                     env={**os.environ, **QUIET, **(env or {})}, start_new_session=True)
        deadline = time.time() + timeout
        while not self.answers(health):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"{name} did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    @staticmethod
    def answers(url: str) -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except urllib.error.HTTPError as err:
            return err.code < 500  # a server behind auth answers its anonymous probe with 401
        except OSError:
            return False

    def stop(self) -> None:
        stop_tree(self.proc)
        self.log.close()


def process_family(pid: int) -> list:
    """The process, every descendant of it, and every member of its process group (psutil handles).
    Descendants count separately: Prefect starts each flow run in a session of its own."""
    import psutil

    family = {}
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            family[proc.pid] = proc
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        try:
            if proc.pid not in family and os.getpgid(proc.pid) == pid:
                family[proc.pid] = proc
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to look at
            continue
    return list(family.values())


def stop_tree(proc: subprocess.Popen, grace: float = 30, kill_wait: float = 30) -> None:
    """Stop a process started by a test and everything it started: SIGTERM to all of them, at most
    `grace` seconds for a clean exit, then SIGKILL to whatever is left (a `prefect worker` may sit on
    its first SIGTERM for over a minute while it shuts down); asserts that nothing is left running."""
    import psutil

    family = process_family(proc.pid)
    for member in family:
        try:
            member.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    # what they started while shutting down counts too
    alive = list({p.pid: p for p in alive + [c for a in alive for c in process_family(a.pid)]}.values())
    for member in alive:
        try:
            member.kill()
        except psutil.Error:
            pass
    _, survivors = psutil.wait_procs(alive, timeout=kill_wait)
    if proc.poll() is None:
        proc.wait(timeout=kill_wait)  # reaped, so it is no zombie of ours
    assert not survivors, f"still running after SIGKILL: {[(p.pid, p.name()) for p in survivors]}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback: SQLite backend store, artifacts served over HTTP (--serve-artifacts)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    server = start_mlflow(root, port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def start_mlflow(root: Path, port: int) -> Server:
    """`mlflow server` on 127.0.0.1:`port`, its SQLite store and artifacts under `root` (started again on
    the same root and port, it serves the same runs)."""
    return Server("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")],
                  f"http://127.0.0.1:{port}/health", root)


def start_prefect(root: Path, port: int) -> Server:
    """`prefect server start` on 127.0.0.1:`port`, its home and SQLite database under `root`."""
    env = {"PREFECT_HOME": str(root / "home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}"}
    return Server("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}/api/health", root, env)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """`prefect server start` on loopback with its own home and SQLite database; yields its API URL."""
    root = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    server = start_prefect(root, port)
    yield f"http://127.0.0.1:{port}/api"
    server.stop()


@pytest.fixture
def servers_env(prefect_api, mlflow_server, tmp_path):
    """Environment for a subprocess that talks to the real servers over HTTP."""
    return {**os.environ, **QUIET, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_server,
            "PREFECT_HOME": str(tmp_path / "prefect_home")}


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
def smollm2_dir(alignflow_home) -> Path:
    """SmolLM2-135M-Instruct: the packaged GGUF converted to safetensors (once per session: a fresh $ALIGNFLOW_HOME)."""
    from alignflow import embedded
    from alignflow.config import load_config

    return Path(embedded.resolve(load_config(ROOT / "configs" / "smollm2-135m.yaml").embedded, "embedded:smollm2-135m",
                                 "model"))


@pytest.fixture(scope="session")
def smoke_data(alignflow_home) -> dict[str, list[dict]]:
    from alignflow import embedded
    from alignflow.config import load_config
    from alignflow.data.instructions import load_rows

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
