"""The team's servers of infra/compose.yaml, run natively on loopback (no Docker engine here): MLflow started
by the compose file's own entrypoint (infra/docker/mlflow-server.sh) on PostgreSQL with basic-auth and
artifacts proxied to an S3-compatible store (moto's server standing in for MinIO), and the Prefect server on
PostgreSQL with Redis messaging and an API auth string. The test starts its own PostgreSQL (password auth,
SCRAM: the machine's server trusts every loopback connection, so a password given there is never checked)
and its own Redis, so it creates and empties only what it owns. A flow run logs into both with credentials
from its environment; anonymous and wrong-password clients are refused, by the servers and by PostgreSQL.
The compose file itself is checked with `docker-compose config`."""

import base64
import glob
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BIN, QUIET, ROOT, SMOKE, Server, free_port, run_in_session, start, stop_tree, wait_for

pytestmark = pytest.mark.slow


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    return run_in_session(["bash", str(ROOT / "infra" / "compose-check.sh"), str(env_file)], timeout=300,
                          capture_output=True, text=True)


def example_keys() -> list[str]:
    text = (ROOT / "infra" / ".env.example").read_text()
    return re.findall(r"^([A-Z_]+)=", text, flags=re.M)


def test_compose_file_resolves_and_no_secret_has_a_default(tmp_path):
    import yaml

    values = {k: ("admin:" if k == "PREFECT_API_AUTH_STRING" else "") + secrets.token_urlsafe(12)
              for k in example_keys()}
    filled = tmp_path / "filled.env"
    filled.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    done = compose_config(filled)
    if done.returncode == 3:
        print("infra/compose-check.sh:", done.stderr.strip())  # in the test's captured output
        pytest.skip("docker-compose cannot be installed on this machine (infra/compose-check.sh needs root and apt)")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    services = resolved["services"]
    assert set(services) == {"postgres", "redis", "minio", "minio-bucket", "mlflow", "prefect-server", "worker"}
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == values["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert mlflow["build"]["dockerfile"] == "infra/docker/mlflow.Dockerfile"
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert prefect["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"
    assert services["worker"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == values["MLFLOW_TRACKING_PASSWORD"]
    for name, service in services.items():  # published on loopback only
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    for built in ("mlflow", "worker"):  # what the images are built from exists
        assert (ROOT / services[built]["build"]["dockerfile"]).is_file()
    assert (ROOT / "infra" / "docker" / "Dockerfile.cuda").is_file()
    compose_text = (ROOT / "infra" / "compose.yaml").read_text()
    assert not [v for v in values.values() if v in compose_text]

    # the example as shipped does not start, and every secret left empty is named (HF_TOKEN is optional)
    unchanged = compose_config(ROOT / "infra" / ".env.example")
    assert unchanged.returncode != 0 and "in infra/.env" in unchanged.stderr
    for key in [k for k in values if k != "HF_TOKEN"]:
        partial = tmp_path / f"without-{key}.env"
        partial.write_text("".join(f"{k}={'' if k == key else v}\n" for k, v in values.items()))
        done = compose_config(partial)
        assert done.returncode != 0 and f"set {key} in infra/.env" in done.stderr, key


def test_mlflow_entrypoint_refuses_to_start_without_its_secret(tmp_path):
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DB_PASSWORD": "x"}
    done = run_in_session(["sh", str(ROOT / "infra" / "docker" / "mlflow-server.sh")], timeout=60, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "MLFLOW_FLASK_SERVER_SECRET_KEY" in done.stderr


def postgres_binaries() -> Path:
    """The directory of PostgreSQL's initdb and postgres (PATH first, then Debian's layout)."""
    found = [Path(shutil.which("initdb")).parent] if shutil.which("initdb") else []
    found += [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for directory in found:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    pytest.skip("PostgreSQL's server programs (initdb, postgres) are not installed: no PostgreSQL for the test to own")


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of the test's own on loopback, password (SCRAM) authentication for every connection,
    with a role and a database per server, as infra/postgres/init-databases.sh makes them; removed afterwards."""
    import psycopg

    bin_dir = postgres_binaries()
    as_postgres = []
    data_root = tmp_path
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the `postgres` user, in a directory it owns
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root with no `postgres` user to run a PostgreSQL server as (initdb refuses root)")
        as_postgres = ["runuser", "-u", "postgres", "--"]
        data_root = Path(tempfile.mkdtemp(prefix="alignflow-test-pg-"))
        os.chown(data_root, account.pw_uid, account.pw_gid)
    try:
        superuser_pw = secrets.token_urlsafe(16)
        (data_root / "pw").write_text(superuser_pw)
        if as_postgres:
            os.chown(data_root / "pw", account.pw_uid, account.pw_gid)
        made = run_in_session([*as_postgres, str(bin_dir / "initdb"), "-D", str(data_root / "data"), "-U", "postgres",
                               "--auth=scram-sha-256", f"--pwfile={data_root / 'pw'}", "--no-sync", "-E", "UTF8"],
                              timeout=300, capture_output=True, text=True)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
        port = free_port()
        log = tmp_path / "postgres.log"
        server = start([*as_postgres, str(bin_dir / "postgres"), "-D", str(data_root / "data"), "-h", "127.0.0.1",
                        "-p", str(port), "-k", str(data_root), "-c", "fsync=off"], log, data_root)
        admin = dict(host="127.0.0.1", port=port, user="postgres", password=superuser_pw)

        def answers() -> bool:
            try:
                psycopg.connect(**admin, dbname="postgres", connect_timeout=5).close()
                return True
            except psycopg.OperationalError:
                return False
        try:
            wait_for("PostgreSQL", answers, server, log, timeout=120)
            passwords = {role: secrets.token_urlsafe(16) for role in ("mlflow", "prefect")}
            names = {"mlflow": "mlflow", "mlflow_auth": "mlflow_auth", "prefect": "prefect"}
            with psycopg.connect(**admin, dbname="postgres", autocommit=True) as conn:
                for role, password in passwords.items():
                    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
                for name, owner in (("mlflow", "mlflow"), ("mlflow_auth", "mlflow"), ("prefect", "prefect")):
                    conn.execute(f'CREATE DATABASE "{name}" OWNER {owner}')
            with psycopg.connect(**admin, dbname="prefect", autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")  # as infra/postgres/init-databases.sh does
            yield {"port": port, "admin": admin, "passwords": passwords, "names": names}
        finally:
            stop_tree(server)
    finally:
        if data_root != tmp_path:
            shutil.rmtree(data_root, ignore_errors=True)


@pytest.fixture
def redis_server(tmp_path):
    """A Redis server of the test's own on loopback (nothing saved to disk): what the test finds in it is
    Prefect's, and nobody else's data is there to be flushed."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: no Redis for the test to own")
    port, log = free_port(), tmp_path / "redis.log"
    server = start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(tmp_path)], log, tmp_path)
    client = redis.Redis(host="127.0.0.1", port=port)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False
    try:
        wait_for("Redis", answers, server, log, timeout=120)
        assert client.dbsize() == 0
        yield port, client
    finally:
        client.close()
        stop_tree(server)


def query(postgres: dict, dbname: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(**postgres["admin"], dbname=dbname) as conn:
        return conn.execute(sql).fetchall()


def status_of(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_a_flow_run_logs_into_both_team_servers(postgres, redis_server, tmp_path, monkeypatch):
    import boto3
    import psycopg

    root = tmp_path
    s3_port, mlflow_port, prefect_port = free_port(), free_port(), free_port()
    s3_env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "alignflow-test",
              "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(12), "AWS_DEFAULT_REGION": "us-east-1"}
    admin_pw, user_pw, auth_string = (secrets.token_urlsafe(16) for _ in range(3))
    auth_string = f"team:{auth_string}"
    databases, db_passwords = postgres["names"], postgres["passwords"]
    # PostgreSQL checks passwords: a wrong one is refused, so the servers below reach it only with theirs
    for role in ("mlflow", "prefect"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host="127.0.0.1", port=postgres["port"], user=role, password="wrong", dbname=role).close()
    servers = []
    try:
        servers.append(Server("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                              f"http://127.0.0.1:{s3_port}/", root))
        s3 = boto3.client("s3", endpoint_url=s3_env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="alignflow-test",
                          aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        s3.create_bucket(Bucket="mlflow")

        mlflow_env = {**s3_env, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DB_USER": "mlflow",
                      "MLFLOW_DB_PASSWORD": db_passwords["mlflow"], "MLFLOW_DB_HOST": "127.0.0.1",
                      "MLFLOW_DB_PORT": str(postgres["port"]),
                      "MLFLOW_DB": databases["mlflow"], "MLFLOW_AUTH_DB": databases["mlflow_auth"],
                      "MLFLOW_AUTH_INI": str(root / "basic_auth.ini"), "MLFLOW_HOST": "127.0.0.1",
                      "MLFLOW_PORT": str(mlflow_port), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw}
        servers.append(Server("mlflow", ["sh", str(ROOT / "infra" / "docker" / "mlflow-server.sh"), "--workers", "1"],
                              f"http://127.0.0.1:{mlflow_port}/health", root, mlflow_env, timeout=180))
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        assert oct((root / "basic_auth.ini").stat().st_mode)[-3:] == "600"
        # the account the flow logs with, created by the admin
        assert status_of(f"{mlflow_url}/api/2.0/mlflow/users/create", "admin", admin_pw,
                         {"username": "alignflow", "password": user_pw}) == 200

        redis_port, redis_client = redis_server
        prefect_env = {"PREFECT_HOME": str(root / "prefect-home"),
                       "PREFECT_API_DATABASE_CONNECTION_URL":
                           f"postgresql+asyncpg://prefect:{db_passwords['prefect']}@127.0.0.1:{postgres['port']}/"
                           f"{databases['prefect']}",
                       "PREFECT_SERVER_API_AUTH_STRING": auth_string,
                       "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
                       "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
                       "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
                       "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
                       "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1", "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
                       "PREFECT_REDIS_MESSAGING_DB": "0"}
        servers.append(Server("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(prefect_port)],
                              f"http://127.0.0.1:{prefect_port}/api/health", root, prefect_env, timeout=180))
        prefect_url = f"http://127.0.0.1:{prefect_port}/api"

        # anonymous and wrong-password clients are refused by both
        assert status_of(f"{mlflow_url}/api/2.0/mlflow/experiments/search", body={"max_results": 1}) == 401
        assert status_of(f"{mlflow_url}/api/2.0/mlflow/experiments/search", "alignflow", "wrong",
                         {"max_results": 1}) == 401
        assert status_of(f"{prefect_url}/flow_runs/filter", body={}) == 401
        assert status_of(f"{prefect_url}/flow_runs/filter", "team", "wrong", {}) == 401

        env = {**os.environ, **QUIET, **s3_env, "PREFECT_API_URL": prefect_url, "PREFECT_API_AUTH_STRING": auth_string,
               "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": "alignflow",
               "MLFLOW_TRACKING_PASSWORD": user_pw, "PREFECT_HOME": str(root / "client-home")}
        env.pop("MLFLOW_S3_ENDPOINT_URL")  # the client uploads through the MLflow server, never to S3 itself
        out = root / "out"
        # the whole flow, kept short (one candidate, a few steps): what is checked is where it all went
        done = run_in_session([str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={out}", "experiment=team",
                               "base.candidates=[embedded:tiny-s]", "sft.trainer.max_steps=3",
                               "dpo.trainer.max_steps=2", "eval.pass_k=0"],
                              timeout=900, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alignflow")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user_pw)
        client = MlflowClient(tracking_uri=mlflow_url)
        experiment = client.get_experiment_by_name("team")
        runs = client.search_runs([experiment.experiment_id])
        assert runs and all(r.info.status == "FINISHED" for r in runs)
        sft = next(r for r in runs if r.data.tags.get("alignflow.stage") == "sft")
        assert "model/model.safetensors" in {a.path for a in client.list_artifacts(sft.info.run_id, "model")}
        stored = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith(f"{sft.info.run_id}/artifacts/model/model.safetensors") for k in stored), stored[:5]
        for run in runs:  # no credential in what was recorded
            recorded = json.dumps([run.data.params, run.data.tags])
            assert user_pw not in recorded and auth_string not in recorded

        # the records are in PostgreSQL, and Prefect's messages went through Redis
        assert query(postgres, databases["mlflow"], "select count(*) from runs")[0][0] == len(runs)
        assert query(postgres, databases["mlflow_auth"], "select username from users order by username") == \
            [("admin",), ("alignflow",)]
        states = query(postgres, databases["prefect"], "select state_type from flow_run")
        assert ("COMPLETED",) in states
        assert redis_client.dbsize() > 0
        flow_run_id = sft.data.tags["prefect.flow_run_id"]
        assert query(postgres, databases["prefect"],
                     f"select count(*) from flow_run where id = '{flow_run_id}'")[0][0] == 1
    finally:
        for server in reversed(servers):
            server.stop()
