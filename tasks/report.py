"""Stage 7: the run report, as an MLflow artifact of the parent run and a Prefect markdown artifact."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from alignflow.tracking import RunContext, tracking_uri
from tasks import stage_logger
from tasks.reporting import build_report
from tasks.stages import Stage, register


def prefect_markdown(markdown: str, run_id: str) -> str:
    """Image links rewritten for Prefect's UI: served by the MLflow server when there is one,
    otherwise named by their MLflow location."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        link = lambda m: f"![{m[1]}]({uri.rstrip('/')}/get-artifact?path=report/{m[2]}&run_uuid={run_id})"  # noqa: E731
    else:
        link = lambda m: f"*[plot {m[1]}: MLflow run `{run_id}`, artifact `report/{m[2]}`]*"  # noqa: E731
    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", link, markdown)


@task(name="report", cache_policy=NONE)
def report(ctx: RunContext) -> str:
    """Build the report from the parent run's MLflow records; returns the markdown path.

    The PNGs sit beside report.md under the parent run's `report/` artifacts; the Prefect artifact
    carries the same markdown with the plots linked to that MLflow location.
    """
    from mlflow.tracking import MlflowClient
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext

    path = build_report(ctx.parent_run_id, Path(ctx.output_dir) / "report")
    MlflowClient().log_artifacts(ctx.parent_run_id, str(path.parent), "report")
    if TaskRunContext.get():  # called as a Prefect task (not directly from a test or notebook)
        create_markdown_artifact(prefect_markdown(path.read_text(), ctx.parent_run_id), key="alignflow-report",
                                 description=f"alignflow run report (MLflow run {ctx.parent_run_id})")
    stage_logger().info("report: %s (MLflow run %s, artifacts report/)", path, ctx.parent_run_id)
    return str(path)


register(Stage(name="report", task=report, cache=False, rerun=False, after=("evaluate", "promote"),
               describe="the run report (markdown and plots) from MLflow's records"))
