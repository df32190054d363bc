"""Logging into a run: params (secrets dropped), metrics in batches, dataset inputs, TRL's training
metrics, and the output reference a stage records for reruns."""

from __future__ import annotations

import os
import time
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from transformers import TrainerCallback

SECRET_MARKERS = ("token", "secret", "password", "api_key", "apikey")


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


def log_dataset(rows: list[dict], source: str, name: str, context: str, digest: str | None = None) -> None:
    """Record a dataset input (name, digest, schema, source) on the active run via mlflow.data. `digest`:
    the whole file's, when `rows` are only its first rows (a large dataset is not held in memory)."""
    import json

    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if digest:  # MLflow keeps 36 characters of a dataset digest (a VARCHAR(36) column on PostgreSQL)
        digest = digest.removeprefix("sha256:")[:32]
    frame = pd.DataFrame([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                          for r in rows])
    if source.startswith("runs:/"):  # MLflow's dataset sources know the store's URI, not runs:/
        source = RunsArtifactRepository.get_underlying_uri(source)
    try:
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
    except MlflowException:  # e.g. a hub dataset name: no resolver; the digest and schema still go in
        dataset = mlflow.data.from_pandas(frame, name=f"{name} ({source})", digest=digest)
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as err:  # two runs logging the same dataset at once: the server's check-then-insert
        if "UNIQUE constraint" not in str(err) and "IntegrityError" not in str(err):  # lost the race; it exists now
            raise
        mlflow.log_input(dataset, context=context)


class TrackingLost(RuntimeError):
    """Metric values that could not reach the tracking server, however long the stage waited for it."""


TRACKING_WAIT = "ALIGNFLOW_TRACKING_WAIT"  # seconds a training stage waits, once trained, for an absent tracking server


def tracking_wait() -> float:
    """$ALIGNFLOW_TRACKING_WAIT (seconds, >= 0), else 600: how long a stage whose training ended while the
    tracking server was away waits for it before failing with TrackingLost. An environment variable, not a
    config key: it is the deployment's tolerance for outages (like MLFLOW_HTTP_REQUEST_TIMEOUT), not part of
    the experiment, and it reaches launched ranks with their environment."""
    raw = os.environ.get(TRACKING_WAIT, "").strip()
    if not raw:
        return 600.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN included
        raise ValueError(f"{TRACKING_WAIT}={raw!r}: expected a number of seconds >= 0")
    return value


class MlflowMetricsCallback(TrainerCallback):
    """TRL's training metrics into the stage's own run, batched: sent every `flush_every` values or
    `flush_seconds`, whichever comes first, so curves appear while training runs.

    Hand-written because transformers' MLflowCallback logs one request per logging step and also
    logs hundreds of TrainingArguments as params; one log_batch is ~50x cheaper than per-value calls.
    A tracking server that is away (past MLflow's own request retries) loses nothing: the values stay
    buffered, training goes on, and they are sent when it answers again; at the end of training the
    callback waits up to `final_wait` seconds for it (default: $ALIGNFLOW_TRACKING_WAIT, else 600), then
    fails the stage naming how many values (and which steps) were not logged (TrackingLost).
    """

    def __init__(self, run_id: str, flush_every: int = 500, flush_seconds: float = 10,
                 final_wait: float | None = None):
        self.run_id, self.flush_every, self.flush_seconds = run_id, flush_every, flush_seconds
        self.final_wait = tracking_wait() if final_wait is None else final_wait
        self.buffer: list[Metric] = []
        self.history: list[dict[str, float]] = []
        self.last_flush, self.away_since = time.monotonic(), None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # launched on several processes: the main one logs
            return
        now = int(time.time() * 1000)
        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.history.append({"step": state.global_step, **numeric})
        self.buffer += [Metric(k.replace("@", "_at_"), v, now, state.global_step) for k, v in numeric.items()]
        if len(self.buffer) >= self.flush_every or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.try_flush()

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        deadline, wait = time.monotonic() + self.final_wait, 2.0
        while not self.try_flush():
            if time.monotonic() > deadline:
                steps = sorted({m.step for m in self.buffer})
                raise TrackingLost(f"{len(self.buffer)} metric values of run {self.run_id} (steps {steps[0]}-"
                                   f"{steps[-1]}) could not be logged: the tracking server did not answer for "
                                   f"{self.final_wait:.0f} s after training ended")
            time.sleep(min(wait, max(deadline - time.monotonic(), 0)))  # backing off while the server is away
            wait = min(wait * 2, 30)

    def try_flush(self) -> bool:
        """Send what is buffered; False (the values kept) when the tracking server cannot be reached."""
        import logging

        self.last_flush = time.monotonic()
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001 - MLflow raises MlflowException or requests' errors here
            if self.away_since is None:
                self.away_since = time.monotonic()
                logging.getLogger("alignflow").warning(
                    "tracking server unreachable (%s): %d metric values kept, sent when it answers again",
                    str(err).splitlines()[0][:200] if str(err) else type(err).__name__, len(self.buffer))
            return False
        if self.away_since is not None:
            logging.getLogger("alignflow").warning("tracking server back after %.0f s: buffered metrics sent",
                                                   time.monotonic() - self.away_since)
            self.away_since = None
        return True

    def flush(self) -> None:
        client = MlflowClient()
        while self.buffer:
            client.log_batch(self.run_id, metrics=self.buffer[:1000])
            self.buffer = self.buffer[1000:]
