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
import uuid

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: the tests build their models
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# the MLflow servers the tests start run no MLflow jobs (GenAI evaluation, prompt optimisation; alignflow uses
# none): with job execution on, each `mlflow server` also starts a job runner and seven huey consumers
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# on N pytest-xdist workers (make test), each worker and what it starts gets its share of the cores for torch's
# threads: N workers at full width oversubscribe the machine
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

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

# Every process this pytest session starts inherits SESSION_MARK (the janitor stops them all if pytest dies);
# every process of one tree that `start` started carries that tree's own TREE_MARK, so `stop_tree` finds those
# that left the tree's process group or session (Prefect starts flow runs in sessions of their own) or were
# orphaned, and a pid reused by a stranger never matches.
SESSION_MARK, TREE_MARK = "ALIGNFLOW_TEST_SESSION", "ALIGNFLOW_TEST_TREE"
os.environ[SESSION_MARK] = uuid.uuid4().hex

JANITOR = f"""
import os, select, signal, sys
import psutil
session, pytest_pid, me = sys.argv[1], os.getppid(), os.getpid()
while os.getppid() == pytest_pid:  # pytest alive; reparented = pytest died, however (SIGKILL included)
    ready, _, _ = select.select([0], [], [], 2)
    if ready and not os.read(0, 512):  # EOF: pytest closed its end (session over) or died
        break
def ours():
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in (me, pytest_pid) and proc.environ().get("{SESSION_MARK}") == session:
                found.append(proc)
        except psutil.Error:
            pass
    return found
for sig in (signal.SIGTERM, signal.SIGKILL):
    left = ours()
    for proc in left:
        try:
            print(sig.name, proc.pid, " ".join(proc.cmdline())[:200], flush=True)
            proc.send_signal(sig)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
"""


@pytest.fixture(scope="session", autouse=True)
def janitor(tmp_path_factory):
    """A watcher outside pytest's process group: when pytest ends or is killed (SIGKILL, a CI timeout), it stops
    every process still carrying this session's mark, so no server of the session outlives it. At a normal end
    anything it had to stop was leaked by a test, and is named on stderr."""
    log = tmp_path_factory.getbasetemp() / "janitor.log"
    env = {k: v for k, v in os.environ.items() if k != SESSION_MARK}
    with open(log, "w") as out:
        watcher = subprocess.Popen([sys.executable, "-c", JANITOR, os.environ[SESSION_MARK]], stdin=subprocess.PIPE,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    yield
    watcher.stdin.close()
    watcher.wait(timeout=60)
    if log.read_text().strip():
        print(f"\nprocesses left running by the tests, stopped at the session's end:\n{log.read_text()}",
              file=sys.__stderr__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a test's process in a session (and so a process group) of its own, stdout and stderr appended to
    `log`; every process of its tree carries a fresh TREE_MARK. Stop it with `stop_tree` or `kill_tree`."""
    mark = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), SESSION_MARK: os.environ[SESSION_MARK], TREE_MARK: mark}
    with open(log, "ab") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.tree_mark = mark
    return proc


def run_in_session(cmd: list[str], timeout: float, grace: float = 5, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, timeout=timeout, **kwargs)` for a test: the command runs in a session of its own and,
    when it overruns, its whole tree is stopped (`stop_tree`: the group, then stragglers by mark), not only the
    command itself (subprocess.run kills the direct child alone, then waits on pipes its children still hold);
    subprocess.TimeoutExpired is raised then, as subprocess.run does. Whatever the command left running when it
    ended is stopped too. `capture_output`, `text`, `input`, `cwd`, `env` as subprocess.run takes them."""
    mark = uuid.uuid4().hex
    if kwargs.pop("capture_output", False):
        kwargs |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    given = kwargs.pop("input", None)
    if given is not None:
        kwargs["stdin"] = subprocess.PIPE
    env = {**(kwargs.pop("env", None) or os.environ), SESSION_MARK: os.environ[SESSION_MARK], TREE_MARK: mark}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **kwargs)
    proc.tree_mark = mark
    try:
        out, err = proc.communicate(given, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc, grace=grace)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    stop_tree(proc, grace=grace)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_for(what: str, check, proc: subprocess.Popen | None = None, log: Path | None = None,
             timeout: float = 300, every: float = 0.5):
    """Poll `check` until it returns something truthy, and return that; fail naming `what` (with the tail of
    `log`) once `timeout` seconds have passed, or as soon as `proc` has exited without `check` holding."""
    def tail() -> str:
        return f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) while waiting for {what}{tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tail()}")
        time.sleep(every)


class Server:
    """A server process on loopback, started in a session of its own (`start`) and stopped with its tree."""

    def __init__(self, name: str, cmd: list[str], health: str, root: Path, env: dict | None = None,
                 timeout: float = 120):
        self.name, self.root, self.log_path = name, root, root / f"{name}.log"
        self.proc = start(cmd, self.log_path, root, {**os.environ, **QUIET, **(env or {})})
        deadline = time.time() + timeout
        while not self.answers(health):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"{name} did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    @staticmethod
    def answers(url: str) -> bool:
        """The health URL answers 2xx (a 404 or 401 is some other server, or a wrong URL; the servers tested
        here answer their health probes without credentials, behind auth too)."""
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 300
        except (OSError, urllib.error.HTTPError):  # refused, reset, timed out, or an HTTP error status
            return False

    def stop(self) -> None:
        """SIGTERM to its tree, a bounded wait, SIGKILL; a second call does nothing."""
        stop_tree(self.proc)

    def kill(self) -> None:
        """The server dies at once: SIGKILL to its whole tree, as a crash or an OOM kill would (no shutdown)."""
        kill_tree(self.proc)


def tree_members(proc: subprocess.Popen) -> list:
    """The live processes (psutil handles) of what `proc` started: itself and its descendants and its process
    group while it is unreaped (its pid, so its group id, cannot be reused until then), and at any time every
    process carrying its TREE_MARK (set by `start`). Zombies are dead and left out."""
    import psutil

    mark, found = getattr(proc, "tree_mark", None), {}
    unreaped = proc.returncode is None
    if unreaped:
        try:
            root = psutil.Process(proc.pid)
            for member in [root, *root.children(recursive=True)]:
                found[member.pid] = member
        except psutil.NoSuchProcess:
            pass
    for member in psutil.process_iter():
        try:
            if member.pid in found:
                continue
            if (unreaped and os.getpgid(member.pid) == proc.pid) or (
                    mark and member.environ().get(TREE_MARK) == mark):
                found[member.pid] = member
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to look at
            continue
    alive = []
    for member in found.values():
        try:
            if member.status() != psutil.STATUS_ZOMBIE:
                alive.append(member)
        except psutil.Error:
            continue
    return alive


def _signal_tree(proc: subprocess.Popen, members: list, sig: int) -> None:
    """`sig` to the process group of `proc` while its group id is provably not reused (`proc` unreaped, or a
    member carrying its mark still in the group), and to every member outside the group one by one (psutil
    checks that a pid was not reused before signalling it)."""
    import psutil

    in_group = []
    for member in members:
        try:
            in_group.append(os.getpgid(member.pid) == proc.pid)
        except OSError:
            in_group.append(False)
    group = any(in_group) and (proc.returncode is None or hasattr(proc, "tree_mark"))
    if group:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            group = False
    for member, member_in_group in zip(members, in_group):
        if group and member_in_group:
            continue
        try:
            member.send_signal(sig)
        except psutil.Error:
            pass


def _until_gone(proc: subprocess.Popen, steps: list[tuple[int, float]]) -> list:
    """Send each (signal, wait) in turn to the tree of `proc` until none of it is left (polled, the tree scanned
    again each time: what it starts while shutting down counts too); then reap `proc`. Returns the survivors."""
    left = tree_members(proc)
    for sig, wait in steps:
        if not left:
            break
        _signal_tree(proc, left, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = tree_members(proc)
    if not left and proc.returncode is None:
        proc.wait(timeout=30)  # an exited leader: reaped now, after its group was last signalled
    proc.stopped_tree = True
    return left


def stop_tree(proc: subprocess.Popen, grace: float = 30, kill_wait: float = 30) -> None:
    """Stop a process started by a test and everything it started: SIGTERM to its process group (and to members
    that left it), at most `grace` seconds for a clean exit, then SIGKILL to whatever is left (a `prefect worker`
    may sit on its first SIGTERM for over a minute while it shuts down); asserts that nothing is left running.
    Stopping twice is safe: a stopped tree is never signalled again (its pids may belong to strangers by then)."""
    if getattr(proc, "stopped_tree", False):
        return
    survivors = _until_gone(proc, [(signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)])
    assert not survivors, f"still running after SIGKILL: {[(p.pid, p.name()) for p in survivors]}"


def kill_tree(proc: subprocess.Popen, wait: float = 30) -> None:
    """SIGKILL to a test's process tree at once (a crash, not a shutdown); asserts that nothing is left."""
    if getattr(proc, "stopped_tree", False):
        return
    survivors = _until_gone(proc, [(signal.SIGKILL, wait)])
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


# --- scheduling the session (make test runs it on pytest-xdist workers, --dist loadfile) ---

# Modules in the order they are handed out, heaviest first (as measured on 2 cores, 2026-12-01), so the workers
# finish together; the rest follow in their usual order (a worker takes the next module when two or fewer of
# its tests are left). The two real-model recipes, all computation, are five modules apart so that they seldom
# run at once; the two that need the vLLM and Label Studio environments come after the first few, as those are
# built in the background from the session's start (below). A scheduling hint only: a module missing here or
# renamed just runs later.
HEAVY_FIRST = ["test_ifeval_recipe.py", "test_team_servers.py", "test_deployments.py", "test_tracking_outage.py",
               "test_report_compare.py", "test_real_model.py", "test_launch.py", "test_grpo.py", "test_human.py",
               "test_vllm_engine.py", "test_prefect_restart.py", "test_secrets.py", "test_resume.py",
               "test_concurrent_runs.py", "test_stage_rerun.py", "test_flow.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept


# The environments of their own that some tests need (infra/vllm-env.sh, infra/label-studio.sh: minutes to build
# on a fresh machine, once per machine) are started building when the session starts, on one worker, so the build
# overlaps other tests; the fixtures run the same script, which waits on the script's lock and finds it built
# (or builds it again, reporting its own error, if the background build failed).
PREBUILDS = {"vllm_python": (["bash", str(ROOT / "infra" / "vllm-env.sh")], "ALIGNFLOW_VLLM_PYTHON"),
             "label_studio": (["bash", str(ROOT / "infra" / "label-studio.sh"), "--install-only"], None)}
_prebuilding: list[subprocess.Popen] = []


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" or session.config.option.collectonly:
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for fixture, (cmd, given) in PREBUILDS.items():
        if fixture in wanted and not (given and os.environ.get(given)):
            env = {**os.environ, "LABEL_STUDIO_USERNAME": "prebuild@example.com", "LABEL_STUDIO_PASSWORD": "unused",
                   "LABEL_STUDIO_API_KEY": "unused"}  # --install-only starts nothing, but the script asks for them
            _prebuilding.append(start(cmd, Path(os.devnull), ROOT, env))


def pytest_sessionfinish(session):
    for proc in _prebuilding:  # still building only if the tests that needed it never ran
        stop_tree(proc, grace=10)
