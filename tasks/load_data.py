"""Stage 0: check the inputs before any model loads: TRL trainer values, then the three datasets,
read, validated and converted.

A bad file fails here with its file, row and field, the MLflow runs are marked FAILED, and the
user's files are only read. The converted copies are what later stages consume and what MLflow holds.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow import embedded
from alignflow.config import PipelineConfig
from alignflow.data import load_rows, write_jsonl
from alignflow.modeling import attn_implementation, check_trainer_config
from alignflow.refs import DatasetRef, digest_path
from alignflow.tracking import RunContext, flatten, log_dataset, record_output, stage_run


@task(name="load_data", cache_policy=NONE)
def load_data(config: PipelineConfig, ctx: RunContext) -> dict[str, DatasetRef]:
    sources = {
        "sft": (config.sft.data, True),
        "prompts": (config.sample.prompts, config.rank.ranker == "verifier"),  # the verifier needs answers
        "eval": (config.eval.data, True),
    }
    params = {f"{name}.{k}": v for name, (src, _) in sources.items() for k, v in flatten(src).items()}
    with stage_run(ctx, "load_data", params) as run_id:
        for name, section in (("sft", config.sft), ("dpo", config.dpo)):
            check_trainer_config(name, section.trl_config, section.trainer, ctx.device, ctx.seed,
                                 section.checkpoint_steps, attn_implementation(section.attn_implementation, ctx.device))
        converted = {}
        for name, (source, require_reference) in sources.items():  # validate all before writing any
            path = embedded.resolve(config.embedded, source.path, "data")
            converted[name] = (path, load_rows(path, split=source.split, limit=source.limit,
                                               require_reference=require_reference))
        refs = {}
        for name, (path, rows) in converted.items():
            out = write_jsonl(rows, Path(ctx.output_dir) / "data" / f"{name}.jsonl")
            log_dataset(rows, source=path, name=name, context=name)
            mlflow.log_artifact(str(out), "data")
            mlflow.log_metric(f"{name}.rows", len(rows))
            refs[name] = DatasetRef(uri=f"runs:/{run_id}/data/{out.name}", digest=digest_path(out), run_id=run_id,
                                    local_path=str(out))
        record_output(refs)
        return refs
