"""MLflow records, split by job: `runs` (run lifecycle), `log` (params, metrics, datasets, outputs),
`cache` (cache-hit records), `results` (the evaluation's result schema). The names below are
re-exported so a stage imports what it logs with from one place."""

from alignflow.tracking.cache import output_source, record_cache_hit, stale_reason
from alignflow.tracking.log import (SECRET_MARKERS, MlflowMetricsCallback, flatten, log_dataset, log_metrics,
                                    log_params, record_output)
from alignflow.tracking.results import EvalResults, eval_metrics
from alignflow.tracking.runs import (RunContext, close_dead_runs, drop_secrets, git_commit, orchestrator_tags,
                                     parent_run, process_tags, stage_run, tracking_uri, ui_page)

__all__ = ["SECRET_MARKERS", "EvalResults", "MlflowMetricsCallback", "RunContext", "close_dead_runs", "drop_secrets",
           "eval_metrics", "flatten", "git_commit", "log_dataset", "log_metrics", "log_params", "output_source",
           "parent_run", "orchestrator_tags", "process_tags", "record_cache_hit", "record_output", "stage_run",
           "stale_reason", "tracking_uri", "ui_page"]
