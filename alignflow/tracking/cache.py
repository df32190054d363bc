"""Cache records: whether a cached stage output can still be served, and the child run that records a hit."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from alignflow.tracking.log import log_metrics, record_output
from alignflow.tracking.results import eval_metrics
from alignflow.tracking.runs import RunContext, stage_run


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
