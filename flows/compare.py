"""`alignflow compare`: the config values that differ between flow runs, and their key eval metrics.

    alignflow compare --experiment alignflow-default          # the latest parent runs of an experiment
    alignflow compare RUN_ID RUN_ID ...                        # these runs
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 alignflow compare ...   # a tracking server

Read through MlflowClient only, so it works the same on the local SQLite store and a remote server.
"""

from __future__ import annotations

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

HEADLINE = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high")
HEALTH = ("eos_rate", "mean_tokens", "repetition_rate")  # what degenerate preference tuning shows (alignflow.health)
VERSUS = ("win_rate_vs_sft", "delta_vs_sft")


def find_runs(client: MlflowClient, run_ids: list[str], experiment: str | None, last: int) -> list[Run]:
    """The named runs, or the latest `last` flow (parent) runs of an experiment, oldest first."""
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    exp = client.get_experiment_by_name(experiment or "alignflow-default")
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at this tracking URI")
    runs = client.search_runs([exp.experiment_id], "attributes.status != 'RUNNING'", max_results=1000,
                              order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][:last]
    if not parents:
        raise LookupError(f"experiment {experiment!r} has no finished flow runs")
    return parents[::-1]


def metric_keys(runs: list[Run]) -> list[str]:
    """Key eval metrics present in any of the runs, in a stable order."""
    from tasks.reporting import model_order

    present = set().union(*(r.data.metrics for r in runs))
    keys = []
    models = {k.split(".")[0] for k in present if k.endswith((".accuracy", ".eos_rate")) and k.count(".") == 1}
    for model in model_order(models):
        keys += [f"{model}.{m}" for m in HEADLINE if f"{model}.{m}" in present]
        keys += sorted(k for k in present if k.startswith(f"{model}.pass_at_") and k.count(".") == 1)
        keys += [f"{model}.{m}" for m in HEALTH if f"{model}.{m}" in present]
        keys += [f"{model}.{m}" for m in VERSUS if f"{model}.{m}" in present]
    return keys


def compare_table(runs: list[Run]) -> list[list[str]]:
    """Rows of [field, value per run]: identity, differing params, then metrics."""
    rows = [["run", *(r.info.run_id[:12] for r in runs)],
            ["name", *(r.info.run_name or "" for r in runs)],
            ["status", *(r.info.status for r in runs)],
            ["promotion", *(r.data.tags.get("alignflow.promotion", "–") for r in runs)]]
    params = sorted(set().union(*(r.data.params for r in runs)))
    for key in params:
        values = [r.data.params.get(key, "–") for r in runs]
        if len(set(values)) > 1:
            rows.append([key, *values])
    for key in metric_keys(runs):
        rows.append([key, *(f"{r.data.metrics[key]:.3f}" if key in r.data.metrics else "–" for r in runs)])
    return rows


def format_table(rows: list[list[str]], width: int = 40) -> str:
    clipped = [[c if len(c) <= width else c[: width - 1] + "…" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in clipped) for i in range(len(clipped[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in clipped]
    lines.insert(4, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
