"""Stage 0: check the inputs before any model loads: every active stage's own check (TRL trainer
configs built as the stage builds them), then the three datasets, read, validated and converted.

A bad file fails here with its file, row and field, the MLflow runs are marked FAILED, and the
user's files are only read. The converted copies are what later stages consume and what MLflow holds.
`alignflow validate` runs the same `preflight`, so it rejects what `alignflow run` rejects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow import embedded
from alignflow.config import PipelineConfig
from alignflow.data.instructions import SAMPLE_ROWS, write_converted
from alignflow.data.preferences import load_preference_rows
from alignflow.data.records import write_jsonl
from alignflow.refs import DatasetRef, digest_path
from alignflow.stats import FLAWS
from alignflow.tracking import RunContext, flatten, log_dataset, record_output, stage_run
from tasks import stages
from tasks.stages import Stage, register


def sources(config: PipelineConfig) -> dict:
    """name -> (data source, how its rows are checked: write_converted's require_reference,
    constraints_suffice, require_constraints); `preference`: dpo.data's pairs (the checks unused); sampling
    prompts only when the pairs are sampled or GRPO trains on them."""
    found = {"sft": (config.sft.data, {"require_reference": True})}
    ranker = config.rank.ranker
    # who scores answers to the prompts: the ranker of the sampled pairs, GRPO's rewards
    scorers = ([ranker] if config.dpo.on_policy() else []) + (config.grpo_rewards() if config.grpo_runs() else [])
    if scorers:  # e.g. the verifier needs reference answers, the constraints ranker constraints
        found["prompts"] = (config.sample.prompts, {"require_reference": any(r.needs_reference for r in scorers),
                                                    "require_constraints": any(r.needs_constraints for r in scorers)})
    if config.dpo.data is not None:
        found["preference"] = (config.dpo.data, {})
    # held-out prompts may lack reference answers when a ranker that needs none judges the models; verifiable
    # constraints stand in for a reference answer
    free = config.eval.win_rate_by == "ranker" and not ranker.needs_reference
    return found | {"eval": (config.eval.data, {"require_reference": not free, "constraints_suffice": True})}


def preflight(config: PipelineConfig, device: str, into: Path | None = None) -> dict[str, tuple[str, dict]]:
    """Every check that needs no model: the stages' own (TRL configs), then every dataset read, validated
    and converted, streaming, into `into/<name>.jsonl` (a temporary directory, removed, when None): all are
    converted before load_data moves any into place. Returns name -> (source path, stats): rows, ties
    dropped, flaw counts and the first rows (alignflow.data.instructions.write_converted)."""
    stages.check_config(config, device)
    if into is None:
        with tempfile.TemporaryDirectory(prefix="alignflow-validate-") as tmp:
            return preflight(config, device, Path(tmp))
    converted = {}
    for name, (source, checks) in sources(config).items():
        path = embedded.resolve(config.embedded, source.path, "data")
        out = into / f"{name}.jsonl"
        if name == "preference":
            pairs, ties = load_preference_rows(path, split=source.split, limit=source.limit, seed=config.seed)
            write_jsonl(pairs, out)
            stats = {"rows": len(pairs), "ties": ties, "flaws": {}, "sample": pairs[:SAMPLE_ROWS]}
        else:
            stats = write_converted(path, out, split=source.split, limit=source.limit, **checks) | {"ties": 0}
        converted[name] = (path, stats)
    return converted


@task(name="load_data", cache_policy=NONE)
def load_data(config: PipelineConfig, ctx: RunContext) -> dict[str, DatasetRef]:
    params = {f"{name}.{k}": v for name, (src, _) in sources(config).items() for k, v in flatten(src).items()}
    with stage_run(ctx, "load_data", params) as run_id:
        data_dir = Path(ctx.output_dir) / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        refs = {}
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".converting-") as staging:
            checked = preflight(config, ctx.device, Path(staging))
            for name, (path, stats) in checked.items():
                out = data_dir / f"{name}.jsonl"
                os.replace(Path(staging) / out.name, out)
                digest = digest_path(out)  # streaming, like the conversion
                log_dataset(stats["sample"], source=path, name=name, context=name, digest=digest)
                mlflow.log_artifact(str(out), "data")
                rows = stats["rows"]
                mlflow.log_metric(f"{name}.rows", rows)
                if name == "preference":  # scored rows whose answers all scored the same: no pair, dropped
                    mlflow.log_metric("preference.ties_dropped", stats["ties"])
                if stats["flaws"]:  # demonstrations known to be flawed (embedded.flaws), by kind
                    mlflow.log_metrics({f"{name}.flaw_share.{kind}": stats["flaws"].get(kind, 0) / rows
                                        for kind in FLAWS})
                refs[name] = DatasetRef(uri=f"runs:/{run_id}/data/{out.name}", digest=digest, run_id=run_id,
                                        local_path=str(out))
        record_output(refs)
        return refs


register(Stage(name="load_data", task=load_data, config={"config": ""}, cache=False, rerun=False,
               describe="read and check the inputs"))
