"""The alignment flow: base-model selection -> SFT -> sampling -> ranking -> DPO (k rounds) -> evaluation
-> run report.

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
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, parent_run
from tasks.dpo import dpo
from tasks.evaluate import evaluate
from tasks.load_data import load_data
from tasks.rank import rank
from tasks.report import report
from tasks.sample import sample
from tasks.select_base import select_base
from tasks.sft import sft


def stage_name(stage: str, variant: str, round_: int, rounds: int) -> str:
    """MLflow child-run names: `dpo`, `rft`; with rounds `dpo.round2`, `sample.rft.round2`."""
    if stage == variant:
        return stage if rounds == 1 else f"{stage}.round{round_}"
    return f"{stage}.round{round_}" if variant == "dpo" else f"{stage}.{variant}.round{round_}"


def preference_rounds(config: PipelineConfig, variant: str, start: ModelRef, first_pairs: DatasetRef,
                      prompts: DatasetRef, ctx: RunContext) -> dict[str, ModelRef]:
    """`dpo.rounds` rounds of sample -> rank -> train from the latest policy (round 1 trains on the
    SFT model's pairs, shared by every variant). Returns {label: model}: the final policy under the
    variant's name, earlier rounds as `<variant>_r<i>`."""
    rounds, policy, pairs, models = config.dpo.rounds, start, first_pairs, {}
    for r in range(1, rounds + 1):
        if r > 1:
            candidates = sample(config.sample, policy, prompts, ctx, name=stage_name("sample", variant, r, rounds),
                                seed_offset=r - 1)
            pairs = rank(config.rank, candidates, ctx, name=stage_name("rank", variant, r, rounds))
        policy = dpo(config.dpo, policy, pairs, ctx, name=stage_name(variant, variant, r, rounds), variant=variant)
        models[variant if r == rounds else f"{variant}_r{r}"] = policy
    return models


@flow(name="align")
def align(config: PipelineConfig) -> dict:
    """Load data -> select base -> SFT -> sample -> rank -> DPO (and baselines) -> evaluate -> report."""
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
        models = {"base": base, "sft": sft_model}
        for variant in ["dpo", *config.dpo.baselines]:
            trained = preference_rounds(config, variant, sft_model, pairs, data["prompts"], ctx)
            # every round of the shipped setting is evaluated; baselines by their final model
            models |= trained if variant == "dpo" else {variant: trained[variant]}
        results = evaluate(config.eval, models, data["eval"], ctx, config.rank)
        results["report"] = report(ctx)
    return {"parent_run_id": parent.run_id, "experiment_id": parent.experiment_id, **results}
