"""Run lifecycle: one MLflow parent run per flow run, one child run per stage, dead runs closed.

Tracking URI: $MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` in the working directory
(MLflow 3 refuses the plain ./mlruns file store unless told). Params are write-once, so every
stage logs into its own child run; nothing is ever logged into a finished run.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunInfo
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from alignflow.tracking.log import SECRET_MARKERS, log_params

# MLflow's experiment kind: alignflow's experiments train models. MLflow 3.17's UI still opens every experiment
# in its GenAI view (a flow run is listed as an "Evaluation"); the view is the page's `workflowType`, so the
# links alignflow prints name it (ui_page). Checked in headless Chromium: docs/records.md.
EXPERIMENT_KIND = "mlflow.experimentKind"


def ui_page(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment or a run, in its model-training view (runs, not evaluations)."""
    run = f"/runs/{run_id}" if run_id else ""
    return f"/#/experiments/{experiment_id}{run}?workflowType=machine_learning"


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


def orchestrator_tags() -> dict[str, str]:
    """The flow run's ids (prefect.flow_run_id, ...), from the Host the stage layer installed (alignflow.host)."""
    from alignflow import host

    return host.current().run_tags()


@contextmanager
def parent_run(experiment: str, run_name: str, config_hash: str, params: dict[str, str],
               config: dict | None = None, tags: dict[str, str] | None = None) -> Iterator[RunInfo]:
    """The flow run's MLflow run (its RunInfo: run_id, experiment_id). An exception marks it FAILED.
    The resolved config is kept as `config.json` (secrets dropped), for reruns of single stages."""
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.set_experiment(experiment)
    if EXPERIMENT_KIND not in found.tags:  # a kind someone chose in the UI is kept
        try:
            MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, "finetuning")
        except MlflowException as err:  # two runs starting at once: the other one tagged it first
            if "UNIQUE" not in str(err) and "IntegrityError" not in str(err) and "duplicate" not in str(err):
                raise
    close_dead_runs(found.experiment_id)
    tags = {"alignflow.config_hash": config_hash, "alignflow.git_commit": git_commit(), **orchestrator_tags(),
            **process_tags(), **(tags or {})}
    with ended(mlflow.start_run(run_name=run_name, tags=tags)) as run:
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
            "alignflow.git_commit": git_commit(), "alignflow.device": ctx.device, **orchestrator_tags(), **process_tags(),
            **ctx.tags,
            **({"alignflow.cache_key": cache_key, "alignflow.cache_hit": "false"} if cache_key else {}),
            **(tags or {})}
    with ended(mlflow.start_run(experiment_id=ctx.experiment_id, run_name=stage, parent_run_id=ctx.parent_run_id,
                                nested=True, tags=tags)) as run:
        log_params(run.info.run_id, params or {})
        yield run.info.run_id


@contextmanager
def ended(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """An active run ended FINISHED, or FAILED by an exception. When the run cannot be marked FAILED (the
    tracking server is away: what a TrackingLost stage is failing for), the exception that failed it is the one
    raised, not the tracking client's; the run stays RUNNING until a later run closes it (close_dead_runs)."""

    def active() -> bool:  # not ended meanwhile by the code inside
        top = mlflow.active_run()
        return top is not None and top.info.run_id == run.info.run_id

    try:
        yield run
    except BaseException:
        try:
            if active():
                mlflow.end_run("FAILED")
        except Exception as err:  # noqa: BLE001 - MlflowException or requests' errors, whichever the client raised
            logging.getLogger("alignflow").warning("run %s could not be marked FAILED: %s", run.info.run_id,
                                                   (str(err).splitlines() or [type(err).__name__])[0][:200])
        raise
    if active():
        mlflow.end_run("FINISHED")


