"""The alignment flow: base-model selection -> SFT -> sampling -> ranking -> DPO -> evaluation.

    alignflow run configs/default.yaml [dotted.key=value ...]

One Prefect flow run is one MLflow parent run; each stage is a Prefect task with its own MLflow
child run, taking references to its inputs and returning a reference to its output.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from alignflow.config import PipelineConfig
from alignflow.modeling import pick_device
from alignflow.tracking import RunContext, flatten, parent_run
from tasks.dpo import dpo
from tasks.evaluate import evaluate
from tasks.load_data import load_data
from tasks.rank import rank
from tasks.sample import sample
from tasks.select_base import select_base
from tasks.sft import sft


@flow(name="align")
def align(config: PipelineConfig) -> dict:
    """Load data -> select base -> SFT -> sample -> rank -> DPO -> evaluate base, SFT and DPO."""
    config_hash = config.digest()
    with parent_run(config.experiment, flow_run.name or "align", config_hash, flatten(config)) as parent:
        ctx = RunContext(experiment_id=parent.experiment_id, parent_run_id=parent.run_id, seed=config.seed,
                         output_dir=str(Path(config.output_dir) / parent.run_id), config_hash=config_hash,
                         device=pick_device(config.device))
        data = load_data(config, ctx)
        base = select_base(config.base, data["sft"], config.embedded, config.sft.lora, ctx)
        sft_model = sft(config.sft, base, data["sft"], ctx, config.base.trust_remote_code)
        candidates = sample(config.sample, sft_model, data["prompts"], ctx)
        pairs = rank(config.rank, candidates, ctx)
        dpo_model = dpo(config.dpo, sft_model, pairs, ctx)
        results = evaluate(config.eval, {"base": base, "sft": sft_model, "dpo": dpo_model}, data["eval"], ctx,
                           config.rank)
    return {"parent_run_id": parent.run_id, "experiment_id": parent.experiment_id, **results}
