"""The alignment flow: base-model selection -> SFT -> sampling -> ranking -> DPO (k rounds) -> evaluation
-> registry and promotion -> run report.

    alignflow run configs/default.yaml [dotted.key=value ...]

One Prefect flow run is one MLflow parent run; each stage is a Prefect task with its own MLflow
child run, taking references to its inputs and returning a reference to its output.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import RunInfo
from prefect import Task, flow, get_run_logger
from prefect.runtime import flow_run

from alignflow.caching import RecordedKey, Uncacheable, stage_key
from alignflow.config import PipelineConfig, load_config, validate_config
from alignflow.modeling import pick_device
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, parent_run, record_cache_hit, stale_reason
from tasks.dpo import dpo
from tasks.evaluate import evaluate
from tasks.load_data import load_data
from tasks.promote import promote
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


def run_stage(stage: Task, config: PipelineConfig, ctx: RunContext, **inputs):
    """Call one stage task; with `cache: true`, through Prefect's cache keyed by alignflow.caching.

    A cache hit is used only if its outputs can still be read with their recorded digests (else the
    stage runs again), and is recorded as the stage's MLflow child run, tagged with the run it came from."""
    name = inputs.get("name", stage.name)
    key = None
    if config.cache:
        try:
            key = stage_key(stage.name, {**inputs, "ctx": ctx})
        except Uncacheable as err:
            get_run_logger().info("%s runs uncached: %s", name, err)
    if key is None:
        return stage(**inputs, ctx=ctx)
    cached = stage.with_options(cache_policy=RecordedKey(), persist_result=True,
                                result_storage=Path(config.output_dir).resolve() / "cache")
    state = cached(**inputs, ctx=ctx, cache_key=key, return_state=True)
    result = state.result()
    if state.name != "Cached":
        return result
    problem = stale_reason(result)
    if problem is None:
        record_cache_hit(ctx, name, key, result)
        return result
    get_run_logger().warning("%s: cached output not usable (%s); running it again", name, problem)
    return cached.with_options(refresh_cache=True)(**inputs, ctx=ctx, cache_key=key)


def preference_rounds(config: PipelineConfig, variant: str, start: ModelRef, first_pairs: DatasetRef,
                      prompts: DatasetRef, ctx: RunContext) -> dict[str, ModelRef]:
    """`dpo.rounds` rounds of sample -> rank -> train from the latest policy (round 1 trains on the
    SFT model's pairs, shared by every variant). Returns {label: model}: the final policy under the
    variant's name, earlier rounds as `<variant>_r<i>`."""
    rounds, policy, pairs, models = config.dpo.rounds, start, first_pairs, {}
    for r in range(1, rounds + 1):
        if r > 1:
            candidates = run_stage(sample, config, ctx, cfg=config.sample, policy=policy, prompts=prompts,
                                   name=stage_name("sample", variant, r, rounds), seed_offset=r - 1)
            pairs = run_stage(rank, config, ctx, cfg=config.rank, candidates=candidates,
                              name=stage_name("rank", variant, r, rounds))
        policy = run_stage(dpo, config, ctx, cfg=config.dpo, policy=policy, pairs=pairs,
                           name=stage_name(variant, variant, r, rounds), variant=variant)
        models[variant if r == rounds else f"{variant}_r{r}"] = policy
    return models


def run_context(config: PipelineConfig, parent: RunInfo) -> RunContext:
    output_dir = Path(config.output_dir).resolve()
    return RunContext(experiment_id=parent.experiment_id, parent_run_id=parent.run_id, seed=config.seed,
                      output_dir=str(output_dir / parent.run_id), stage_root=str(output_dir / "stages"),
                      config_hash=config.digest(), device=pick_device(config.device))


def resolve_config(config: PipelineConfig | str, overrides: list[str] | None) -> PipelineConfig:
    """A config model as is, or a YAML path (relative to the working directory), then the overrides."""
    if isinstance(config, str):
        return load_config(config, overrides or [])
    if not overrides:
        return config
    return validate_config(config.model_dump(mode="json"), source="flow parameters", overrides=overrides)


@flow(name="align")
def align(config: PipelineConfig | str = "configs/default.yaml", overrides: list[str] | None = None) -> dict:
    """Load data -> select base -> SFT -> sample -> rank -> DPO (and baselines) -> evaluate -> report.

    `config` is the whole config (the Prefect UI shows it as a form) or the path of a YAML file;
    `overrides` are dotted.key=value strings applied on top."""
    config = resolve_config(config, overrides)
    with parent_run(config.experiment, flow_run.name or "align", config.digest(), flatten(config),
                    config=config.model_dump(mode="json")) as parent:
        ctx = run_context(config, parent)
        data = load_data(config, ctx)  # always runs: it reads the inputs and gives their content digests
        base = run_stage(select_base, config, ctx, cfg=config.base, data=data["sft"], spec=config.embedded,
                         lora=config.sft.lora)
        sft_model = run_stage(sft, config, ctx, cfg=config.sft, base=base, data=data["sft"],
                              trust_remote_code=config.base.trust_remote_code)
        candidates = run_stage(sample, config, ctx, cfg=config.sample, policy=sft_model, prompts=data["prompts"])
        pairs = run_stage(rank, config, ctx, cfg=config.rank, candidates=candidates)
        models = {"base": base, "sft": sft_model}
        for variant in ["dpo", *config.dpo.baselines]:
            trained = preference_rounds(config, variant, sft_model, pairs, data["prompts"], ctx)
            # every round of the shipped setting is evaluated; baselines by their final model
            models |= trained if variant == "dpo" else {variant: trained[variant]}
        results = run_stage(evaluate, config, ctx, cfg=config.eval, models=models, data=data["eval"],
                            rank_cfg=config.rank)
        if config.registry.enabled:  # registry state changes between runs: never cached
            results["promotion"] = promote(config.registry, config.experiment, sft_model, models["dpo"],
                                           data["eval"], config.eval, results["correct"]["dpo"], ctx)
        results["report"] = report(ctx)
    return {"parent_run_id": parent.run_id, "experiment_id": parent.experiment_id, **results}
