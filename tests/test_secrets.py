"""Secrets (issue 15, case 9; issue 26): each token given in the environment is used for real by an `alignflow run`
and reaches no record of it. HF_TOKEN fetches the base model from a hub that refuses requests without it,
OPENAI_API_KEY is sent to a served judge that refuses any other key, and MLFLOW_TRACKING_PASSWORD logs into
MLflow's basic-auth server; then the whole MLflow store (database, artifacts, the report), the servers' logs,
the run's own output and what Prefect's API holds of the run (parameters, logs, task runs, artifacts) are
searched for each value. A credential written into a config URL (an endpoint or a data source) is refused
before anything runs, naming the key and not the secret."""

import base64
import hashlib
import json
import os
import re
import secrets
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from alignflow.config import ConfigError, load_config
from tests.conftest import BIN, QUIET, SMOKE, Server, free_port, start, stop_tree

SECRETS = {name: f"{prefix}-do-not-log-{secrets.token_hex(4)}" for name, prefix in
           (("HF_TOKEN", "hf"), ("OPENAI_API_KEY", "sk"), ("MLFLOW_TRACKING_PASSWORD", "pw"))}
USER = "alignflow"  # the MLflow account the run logs in with
REPO, COMMIT = "team/tiny-s", "0123456789abcdef0123456789abcdef01234567"  # the model on the loopback hub


@pytest.mark.parametrize("override", [
    "rank.ranker={type: judge, model: m, url: 'http://user:sk-in-url-1@127.0.0.1:9/v1'}",
    "sft.data.path=https://example.invalid/sft.jsonl?token=tok-in-url-2",
    "sample.engine={type: openai, url: 'http://127.0.0.1:9/v1?api_key=key-in-url-3', model: m}",
])
def test_a_credential_in_a_config_url_is_refused_naming_the_key(override):
    with pytest.raises(ConfigError) as refused:
        load_config(SMOKE, [override])
    message = str(refused.value)
    key = override.split("=")[0]
    assert f"{key}." in message or f"{key}:" in message, message
    assert "carries a credential" in message
    assert not any(secret in message for secret in ("sk-in-url-1", "tok-in-url-2", "key-in-url-3"))


class KeyedServer:
    """A loopback HTTP server in a thread that answers requests under `guarded` paths only when they carry
    `Authorization: Bearer <key>` (401 otherwise), counting both; other paths are 404 and not counted (the hub
    client also asks for things this hub does not serve). `routes(handler, path)` returns (content type, body[,
    headers]) or None (404)."""

    def __init__(self, key: str, guarded: tuple[str, ...], routes):
        self.accepted = self.refused = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test reads the counts
                pass

            def _answer(self, head: bool):
                path = unquote(urlparse(self.path).path)
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""
                if not path.startswith(guarded):
                    return self._send(404, b"{}", "application/json", head)
                if self.headers.get("Authorization") != f"Bearer {key}":
                    owner.refused += 1
                    return self._send(401, b'{"error": "invalid api key"}', "application/json", head)
                owner.accepted += 1
                found = routes(self, path)
                if found is None:
                    return self._send(404, b"{}", "application/json", head)
                return self._send(200, found[1], found[0], head, found[2] if len(found) > 2 else {})

            def _send(self, status, body: bytes, content_type: str, head: bool, headers: dict | None = None):
                self.send_response(status)
                for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                                    **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self):
                self._answer(head=False)

            def do_HEAD(self):
                self._answer(head=True)

            def do_POST(self):
                self._answer(head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def hub_routes(model_dir: Path):
    """The three calls `huggingface_hub.snapshot_download` makes: repo info, the file tree, each file."""
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    as_json = "application/json"

    def routes(handler, path: str):
        if path.startswith(f"/api/models/{REPO}/revision/"):
            return as_json, json.dumps({"id": REPO, "sha": COMMIT,
                                        "siblings": [{"rfilename": name} for name in files]}).encode()
        if path.startswith(f"/api/models/{REPO}/tree/"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return as_json, json.dumps(tree).encode()
        if path.startswith(f"/{REPO}/resolve/") and (name := path.split("/", 5)[-1]) in files:
            data = files[name]
            return "application/octet-stream", data, {"X-Repo-Commit": COMMIT,
                                                      "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        return None
    return routes


ANSWER = re.compile(r"\[The Start of Assistant (A|B)'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


def judge_routes(handler, path: str):
    """OpenAI's chat completions as a pairwise judge: the shorter answer wins, equal lengths tie."""
    if path != "/v1/chat/completions":
        return None
    request = json.loads(handler.body)
    answers = dict(ANSWER.findall(request["messages"][-1]["content"]))
    a, b = len(answers.get("A", "")), len(answers.get("B", ""))
    verdict = "[[A]]" if a < b else "[[B]]" if b < a else "[[C]]"
    return "application/json", json.dumps({
        "id": "judge-1", "object": "chat.completion", "created": 0, "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def start_auth_mlflow(root: Path) -> tuple[Server, str]:
    """`mlflow server --app-name basic-auth` on loopback, SQLite stores under root, with the run's account
    (USER, its password the secret) made by the admin."""
    admin_password = secrets.token_urlsafe(16)
    root.mkdir()
    ini = root / "basic_auth.ini"
    # the password check (PBKDF2) is cached: without it every one of the run's requests hashes the password
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                   "admin_username = admin\nauth_cache_ttl_seconds = 600\n")
    port = free_port()
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}
    server = Server("mlflow-auth", [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                                    "--port", str(port), "--workers", "1", "--backend-store-uri",
                                    f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts", "--artifacts-destination",
                                    str(root / "artifacts")],
                    f"http://127.0.0.1:{port}/health", root, env, timeout=180)
    url = f"http://127.0.0.1:{port}"
    admin = base64.b64encode(f"admin:{admin_password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", method="POST",
                                     data=json.dumps({"username": USER,
                                                      "password": SECRETS["MLFLOW_TRACKING_PASSWORD"]}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    return server, url


def server_log(api_url: str) -> Path:
    """The file the server listening at api_url writes its output to (its stdout, read from /proc)."""
    import psutil

    port = urlparse(api_url).port
    for proc in psutil.process_iter():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")):
                log = Path(os.readlink(f"/proc/{proc.pid}/fd/1"))
                assert log.is_file(), f"the server on port {port} writes its output to {log}, not a file"
                return log
        except (psutil.Error, OSError):
            continue
    pytest.fail(f"no process listens on port {port}")


@pytest.mark.slow
def test_environment_secrets_are_used_and_reach_no_record(prefect_api, tiny_model_path, tmp_path):
    from mlflow.tracking import MlflowClient
    from openai import AuthenticationError, OpenAI
    from prefect import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    hub = KeyedServer(SECRETS["HF_TOKEN"], (f"/api/models/{REPO}/", f"/{REPO}/resolve/"),
                      hub_routes(Path(tiny_model_path)))
    judge = KeyedServer(SECRETS["OPENAI_API_KEY"], ("/v1/",), judge_routes)
    mlflow_server, proc = None, None
    try:
        # each server checks its secret: without it, or with another, a client is refused
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{judge.url}/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
                model="judge", messages=[{"role": "user", "content": "x"}])
        assert status_of(f"{hub.url}/api/models/{REPO}/revision/main") == 401
        assert (hub.refused, judge.refused) == (1, 1)
        mlflow_server, mlflow_url = start_auth_mlflow(tmp_path / "mlflow")
        assert status_of(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
        wrong = base64.b64encode(f"{USER}:wrong".encode()).decode()
        assert status_of(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                         {"Authorization": f"Basic {wrong}"}) == 401

        env = {**os.environ, **QUIET, **SECRETS, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
               "HF_HOME": str(tmp_path / "hf"), "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": USER,
               "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
        run_log = tmp_path / "run.log"
        # the whole flow, kept short: what is checked is where the secrets went, not what was learnt
        proc = start([str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={tmp_path / 'out'}", "experiment=secrets",
                      f"base.candidates=[{REPO}]", f"base.revision={COMMIT}",
                      f"rank.ranker={{type: judge, model: judge, url: '{judge.url}/v1', max_pairs: 2}}",
                      "sft.trainer.max_steps=3", "dpo.trainer.max_steps=2", "eval.pass_k=0"], run_log, tmp_path, env)
        assert proc.wait(timeout=900) == 0, run_log.read_text()[-4000:]
    finally:
        if proc is not None:
            stop_tree(proc)
        if mlflow_server is not None:
            mlflow_server.stop()
        hub.stop()
        judge.stop()
    # every secret was used: the model came from the hub, the judge ranked, the run logged into MLflow
    assert hub.accepted >= 3 and judge.accepted > 0 and (hub.refused, judge.refused) == (1, 1)
    # (the MLflow server is stopped; its records are read from its files below)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and {r.data.tags.get("alignflow.stage") for r in runs} >= {"rank", "dpo"}
    assert any(k.startswith("judge.") for r in runs for k in r.data.metrics)
    flow_run_id = parent.data.tags["prefect.flow_run_id"]

    # the secrets as they would appear: raw, and the password inside a basic-auth header
    needles = {name: [value.encode()] for name, value in SECRETS.items()}
    needles["MLFLOW_TRACKING_PASSWORD"].append(
        base64.b64encode(f"{USER}:{SECRETS['MLFLOW_TRACKING_PASSWORD']}".encode()))

    def leaked(data: bytes) -> list[str]:
        return [name for name, values in needles.items() if any(v in data for v in values)]

    # MLflow's stores (runs, params, tags, metrics, inputs; the auth database), every artifact (the report among
    # them), the MLflow server's log, the run's output, the hub cache; and the Prefect server's log
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"mlflow.db", "auth.db", "mlflow-auth.log", "run.log"} <= names
    assert any(f.suffix == ".safetensors" for f in files) and any(n.startswith("report") for n in names)
    files.append(server_log(prefect_api))
    for file in files:
        assert not leaked(file.read_bytes()), f"{file} holds {leaked(file.read_bytes())}"

    async def prefect_records():
        async with get_client() as prefect:
            run = await prefect.read_flow_run(flow_run_id)
            logs = await prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            tasks = await prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            artifacts = await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return run, logs, tasks, artifacts

    import asyncio

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        run, logs, tasks, artifacts = asyncio.run(prefect_records())
    assert logs and tasks and artifacts  # the stages logged through Prefect, the report is one of its artifacts
    recorded = json.dumps({"run": run.model_dump(mode="json"), "logs": [log.model_dump(mode="json") for log in logs],
                           "tasks": [t.model_dump(mode="json") for t in tasks],
                           "artifacts": [a.model_dump(mode="json") for a in artifacts]}, default=str)
    assert not leaked(recorded.encode())
