"""MLflow records: one parent run per flow run, one child run per stage, metrics in batches.

Tracking URI: $MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` in the working directory
(MLflow 3 refuses the plain ./mlruns file store unless told). Params are write-once, so every
stage logs into its own child run; nothing is ever logged into a finished run.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunInfo
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from transformers import TrainerCallback

SECRET_MARKERS = ("token", "secret", "password", "api_key", "apikey")


class RunContext(BaseModel):
    """What every stage needs to record itself: handed from the flow to each task."""

    experiment_id: str
    parent_run_id: str
    output_dir: str
    config_hash: str
    seed: int
    device: str
    stage_root: str | None = None  # where keyed (cacheable, resumable) stages write: <output_dir>/stages
    tags: dict[str, str] = {}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'sft.trainer.learning_rate': '0.0001'}; values that look secret are dropped."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    if not isinstance(tree, dict):
        return {prefix: str(tree)[:6000]}  # MLflow's param value limit
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if any(marker in str(key).lower() for marker in SECRET_MARKERS):
            continue
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def process_tags() -> dict[str, str]:
    return {"alignflow.host": socket.gethostname(), "alignflow.pid": str(os.getpid())}


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs this machine started whose process is gone (SIGKILL, out of memory, power
    loss): such a process could not end its runs, and no dead run may stay RUNNING. Their work is
    not lost: a rerun resumes from the stage's last complete checkpoint."""
    import psutil

    client = MlflowClient()
    closed = []
    query = f"attributes.status = 'RUNNING' and tags.`alignflow.host` = '{socket.gethostname()}'"
    for run in client.search_runs([experiment_id], query, max_results=1000):
        pid = int(run.data.tags.get("alignflow.pid", "0") or 0)
        try:
            alive = pid > 0 and psutil.Process(pid).create_time() * 1000 <= run.info.start_time + 1000
        except psutil.Error:
            alive = False
        if not alive:
            client.set_tag(run.info.run_id, "alignflow.closed", f"process {pid} gone; marked KILLED by a later run")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def drop_secrets(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: drop_secrets(v) for k, v in tree.items()
                if not any(marker in str(k).lower() for marker in SECRET_MARKERS)}
    return [drop_secrets(v) for v in tree] if isinstance(tree, list) else tree


def prefect_tags() -> dict[str, str]:
    from prefect.runtime import deployment, flow_run

    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
            "prefect.deployment_id": deployment.id}
    return {k: str(v) for k, v in tags.items() if v}


@contextmanager
def parent_run(experiment: str, run_name: str, config_hash: str, params: dict[str, str],
               config: dict | None = None, tags: dict[str, str] | None = None) -> Iterator[RunInfo]:
    """The flow run's MLflow run (its RunInfo: run_id, experiment_id). An exception marks it FAILED.
    The resolved config is kept as `config.json` (secrets dropped), for reruns of single stages."""
    mlflow.set_tracking_uri(tracking_uri())
    close_dead_runs(mlflow.set_experiment(experiment).experiment_id)
    tags = {"alignflow.config_hash": config_hash, "alignflow.git_commit": git_commit(), **prefect_tags(),
            **process_tags(), **(tags or {})}
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        log_params(run.info.run_id, params)
        if config is not None:
            mlflow.log_dict(drop_secrets(config), "config.json")
        yield run.info


@contextmanager
def stage_run(ctx: RunContext, stage: str, params: dict[str, str] | None = None, cache_key: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[str]:
    """A child run for one stage, active in this thread so library callbacks log into it."""
    mlflow.set_tracking_uri(tracking_uri())
    tags = {"alignflow.stage": stage, "alignflow.config_hash": ctx.config_hash,
            "alignflow.git_commit": git_commit(), "alignflow.device": ctx.device, **prefect_tags(), **process_tags(),
            **ctx.tags,
            **({"alignflow.cache_key": cache_key, "alignflow.cache_hit": "false"} if cache_key else {}),
            **(tags or {})}
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=stage, parent_run_id=ctx.parent_run_id,
                          nested=True, tags=tags) as run:
        log_params(run.info.run_id, params or {})
        yield run.info.run_id


def record_output(output) -> None:
    """Tag the active stage run with its output reference(s) as JSON (`alignflow.output`), so a later
    rerun of one stage can find its inputs by flow run (`alignflow stage NAME --from-run RUN_ID`)."""
    import json

    from alignflow.refs import ArtifactRef

    if isinstance(output, dict):
        value = json.dumps({k: v.model_dump(mode="json") for k, v in output.items() if isinstance(v, ArtifactRef)})
    else:
        value = output.model_dump_json()
        if output.chat_template:
            mlflow.set_tag("alignflow.chat_template", output.chat_template)
    mlflow.set_tag("alignflow.output", value)


def eval_metrics(results: dict) -> dict[str, float]:
    """Evaluate's results as the parent run's metric columns: `<model>.<metric>`."""
    return {f"{name}.{k}": v for name, m in results["metrics"].items() for k, v in m.items()}


def output_source(output) -> str | None:
    """The MLflow run that made a stage output: a reference's run, or evaluate's own run."""
    from alignflow.refs import ArtifactRef

    return output.run_id if isinstance(output, ArtifactRef) else output.get("eval_run_id")


def stale_reason(output) -> str | None:
    """Why a cached stage output cannot be served (None: it can): the run that made it is gone, or
    neither its local copy nor its MLflow artifact is there. Consumers still check the content digest
    when they read it (ArtifactRef.resolve)."""
    from mlflow.exceptions import MlflowException

    from alignflow.refs import ArtifactRef

    source = output_source(output)
    client = MlflowClient()
    try:
        if source is None or client.get_run(source).info.lifecycle_stage == "deleted":
            return f"source run {source} deleted"
    except MlflowException:
        return f"source run {source} not found"
    if not isinstance(output, ArtifactRef) or not output.uri.startswith("runs:/"):
        return None
    if output.local_path and Path(output.local_path).exists():
        return None
    run_id, _, path = output.uri.removeprefix("runs:/").partition("/")
    parent = path.rpartition("/")[0]
    if not any(a.path == path for a in client.list_artifacts(run_id, parent or None)):
        return f"artifact {output.uri} missing"
    return None


def record_cache_hit(ctx: RunContext, name: str, cache_key: str, output) -> str:
    """The stage's child run for a cache hit: tagged with the run the output came from; an
    evaluation hit puts its metrics on this flow run's parent run as a fresh evaluation would."""
    from alignflow.refs import ArtifactRef

    tags = {"alignflow.cache_hit": "true", "alignflow.cache_source_run": str(output_source(output))}
    with stage_run(ctx, name, cache_key=cache_key, tags=tags) as run_id:
        if isinstance(output, ArtifactRef):
            record_output(output)
        else:
            log_metrics(run_id, eval_metrics(output))
            log_metrics(ctx.parent_run_id, eval_metrics(output))
    return run_id


def log_params(run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k[:250], v) for k, v in params.items()]
    client = MlflowClient()
    for start in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client = MlflowClient()
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start:start + 1000])


def log_dataset(rows: list[dict], source: str, name: str, context: str) -> None:
    """Record a dataset input (name, digest, schema, source) on the active run via mlflow.data."""
    import json

    import pandas as pd

    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    frame = pd.DataFrame([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                          for r in rows])
    if source.startswith("runs:/"):  # MLflow's dataset sources know the store's URI, not runs:/
        source = RunsArtifactRepository.get_underlying_uri(source)
    try:
        dataset = mlflow.data.from_pandas(frame, source=source, name=name)
    except MlflowException:  # e.g. a hub dataset name: no resolver; the digest and schema still go in
        dataset = mlflow.data.from_pandas(frame, name=f"{name} ({source})")
    mlflow.log_input(dataset, context=context)


class MlflowMetricsCallback(TrainerCallback):
    """TRL's training metrics into the stage's own run, batched.

    Hand-written because transformers' MLflowCallback logs one request per logging step and also
    logs hundreds of TrainingArguments as params; one log_batch is ~50x cheaper than per-value calls.
    """

    def __init__(self, run_id: str, flush_every: int = 500):
        self.run_id, self.flush_every, self.buffer = run_id, flush_every, []
        self.history: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = int(time.time() * 1000)
        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.history.append({"step": state.global_step, **numeric})
        self.buffer += [Metric(k.replace("@", "_at_"), v, now, state.global_step) for k, v in numeric.items()]
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

    def flush(self) -> None:
        client = MlflowClient()
        while self.buffer:
            client.log_batch(self.run_id, metrics=self.buffer[:1000])
            self.buffer = self.buffer[1000:]
