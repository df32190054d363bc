"""Stage 0: check the inputs before any model loads: every active stage's own check (TRL trainer
configs built as the stage builds them), then the three datasets, read, validated and converted.

A bad file fails here with its file, row and field, the MLflow runs are marked FAILED, and the
user's files are only read. The converted copies are what later stages consume and what MLflow holds.
`alignflow validate` runs the same `preflight`, so it rejects what `alignflow run` rejects.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow import embedded, stages
from alignflow.config import PipelineConfig
from alignflow.data import load_preference_rows, load_rows, write_jsonl
from alignflow.refs import DatasetRef, digest_path
from alignflow.stages import Stage, register
from alignflow.stats import FLAWS
from alignflow.tracking import RunContext, flatten, log_dataset, record_output, stage_run


def sources(config: PipelineConfig) -> dict:
    """name -> (data source, whether each row needs a reference answer); `preference`: dpo.data's pairs
    (the reference flag unused); sampling prompts only when the pairs are sampled."""
    found = {"sft": (config.sft.data, True)}
    if config.dpo.on_policy():
        found["prompts"] = (config.sample.prompts, config.rank.ranker.needs_reference)  # e.g. the verifier
    if config.dpo.data is not None:
        found["preference"] = (config.dpo.data, False)
    # held-out prompts may lack reference answers when a ranker that needs none judges the models
    free = config.eval.win_rate_by == "ranker" and not config.rank.ranker.needs_reference
    return found | {"eval": (config.eval.data, not free)}


def preflight(config: PipelineConfig, device: str) -> dict[str, tuple[str, list[dict]]]:
    """Every check that needs no model: the stages' own (TRL configs), then every dataset read and
    validated (all before any is written). Returns name -> (source path, (converted rows, ties dropped))."""
    stages.check_config(config, device)
    converted = {}
    for name, (source, require_reference) in sources(config).items():
        path = embedded.resolve(config.embedded, source.path, "data")
        if name == "preference":
            converted[name] = (path, load_preference_rows(path, split=source.split, limit=source.limit,
                                                          seed=config.seed))
        else:
            converted[name] = (path, (load_rows(path, split=source.split, limit=source.limit,
                                                require_reference=require_reference), 0))
    return converted


@task(name="load_data", cache_policy=NONE)
def load_data(config: PipelineConfig, ctx: RunContext) -> dict[str, DatasetRef]:
    params = {f"{name}.{k}": v for name, (src, _) in sources(config).items() for k, v in flatten(src).items()}
    with stage_run(ctx, "load_data", params) as run_id:
        refs = {}
        for name, (path, (rows, ties)) in preflight(config, ctx.device).items():
            out = write_jsonl(rows, Path(ctx.output_dir) / "data" / f"{name}.jsonl")
            log_dataset(rows, source=path, name=name, context=name)
            mlflow.log_artifact(str(out), "data")
            mlflow.log_metric(f"{name}.rows", len(rows))
            if name == "preference":  # scored rows whose answers all scored the same: no pair, dropped
                mlflow.log_metric("preference.ties_dropped", ties)
            if any(r.get("flaw") for r in rows):  # demonstrations known to be flawed (embedded.flaws), by kind
                mlflow.log_metrics({f"{name}.flaw_share.{kind}": sum(r.get("flaw") == kind for r in rows) / len(rows)
                                    for kind in FLAWS})
            refs[name] = DatasetRef(uri=f"runs:/{run_id}/data/{out.name}", digest=digest_path(out), run_id=run_id,
                                    local_path=str(out))
        record_output(refs)
        return refs


register(Stage(name="load_data", task=load_data, config={"config": ""}, cache=False, rerun=False,
               describe="read and check the inputs"))
