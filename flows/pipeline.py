"""The alignment flow: base-model selection -> SFT -> sampling -> ranking -> DPO (k rounds) -> evaluation
-> registry and promotion -> run report.

    alignflow run configs/default.yaml [dotted.key=value ...]

One Prefect flow run is one MLflow parent run; each stage is a Prefect task with its own MLflow
child run, taking references to its inputs and returning a reference to its output. Which config
sections and upstream outputs a stage takes is declared with the stage (tasks.stages): the
flow body below only says the order, and passes what differs between rounds.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import RunInfo
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from alignflow.config import PipelineConfig, load_config, validate_config
from alignflow.models.loading import pick_device
from alignflow.pins import Uncacheable
from alignflow.refs import ModelRef
from alignflow.tracking import RunContext, flatten, parent_run, record_cache_hit, stale_reason
from tasks import stages
from tasks.caching import RecordedKey, stage_key
from tasks.stages import round_label, stage_name


def run_stage(stage_id: str, config: PipelineConfig, ctx: RunContext, outputs: dict, **given):
    """Call one registered stage with the config sections and upstream outputs it declares (`given`
    overrides them); with `cache: true`, through Prefect's cache keyed by tasks.caching.

    A cache hit is used only if its outputs can still be read with their recorded digests (else the
    stage runs again), and is recorded as the stage's MLflow child run, tagged with the run it came from."""
    stage = stages.get(stage_id)
    inputs = stage.arguments(config, outputs, **given)
    run_name = inputs.get("name", stage_id)
    key = None
    if config.cache and stage.cache:
        try:
            key = stage_key(stage, {**inputs, "ctx": ctx})
        except Uncacheable as err:
            get_run_logger().info("%s runs uncached: %s", run_name, err)
    if key is None:
        return stage.task(**inputs, ctx=ctx)
    cache = Path(config.output_dir).resolve() / "cache"
    cached = stage.task.with_options(cache_policy=RecordedKey(), persist_result=True, result_storage=cache)
    with stage_lock(cache / "locks" / f"{key}.lock", run_name):
        state = cached(**inputs, ctx=ctx, cache_key=key, return_state=True)
        result = state.result()
        if state.name != "Cached":
            return result
        problem = stale_reason(result)
        if problem is None:
            record_cache_hit(ctx, run_name, key, result)
            return result
        get_run_logger().warning("%s: cached output not usable (%s); running it again", run_name, problem)
        return cached.with_options(refresh_cache=True)(**inputs, ctx=ctx, cache_key=key)


@contextmanager
def stage_lock(path: Path, run_name: str):
    """One writer per cache key: a second run reaching a stage that another run is computing waits here,
    then finds its cached result. An OS file lock (the `filelock` package: flock), not Prefect's SERIALIZABLE
    isolation, whose lock files outlive a killed holder: the kernel releases this one when its process dies,
    so a SIGKILLed run never blocks the next."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        get_run_logger().info("%s: another run is computing this stage (lock %s); waiting for its result",
                              run_name, path)
        lock.acquire()  # held by a live process only: it finishes or dies, and either releases it
    try:
        yield
    finally:
        lock.release()


def preference_rounds(config: PipelineConfig, variant: str, outputs: dict, ctx: RunContext) -> dict[str, ModelRef]:
    """`dpo.rounds` rounds of sample -> rank -> train from the latest policy (round 1 trains on the
    SFT model's pairs, shared by every variant). Returns {label: model}: the final policy under the
    variant's name, earlier rounds as `<variant>_r<i>` (tasks.stages.round_label)."""
    if "pairs" not in stages.get(variant).inputs:  # online (grpo): it samples from its own policy as it trains
        return {variant: run_stage(variant, config, ctx, outputs)}
    rounds, policy, models = config.dpo.rounds, outputs["sft"], {}
    pairs = stages.output_value(outputs, stages.get(variant).inputs["pairs"])
    for r in range(1, rounds + 1):
        if r > 1:
            candidates = run_stage("sample", config, ctx, outputs, policy=policy, seed_offset=r - 1,
                                   name=stage_name("sample", variant, r, rounds))
            pairs = run_stage("rank", config, ctx, outputs, candidates=candidates,
                              name=stage_name("rank", variant, r, rounds))
        policy = run_stage(variant, config, ctx, outputs, policy=policy, pairs=pairs,
                           name=stage_name(variant, variant, r, rounds))
        models[round_label(variant, r, rounds)] = policy
    return models


def preference_baselines(config: PipelineConfig) -> list[str]:
    """The baselines of dpo this config runs (each stage's own declaration says whether), in the config's order."""
    listed = config.dpo.baselines
    running = [name for name in stages.baselines("dpo") if stages.get(name).runs(config)]
    return sorted(running, key=lambda name: listed.index(name) if name in listed else len(listed))


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
        out: dict = {}
        out["load_data"] = run_stage("load_data", config, ctx, out)  # always runs: reads and checks the inputs
        out["select_base"] = run_stage("select_base", config, ctx, out)
        out["sft"] = run_stage("sft", config, ctx, out)
        if stages.get("sample").runs(config):  # with dpo.data alone, DPO trains on the user's pairs: no sampling
            out["sample"] = run_stage("sample", config, ctx, out)
            out["rank"] = run_stage("rank", config, ctx, out)
        out[stages.MODELS] = {"base": out["select_base"], "sft": out["sft"]}
        for variant in ["dpo", *preference_baselines(config)]:
            trained = preference_rounds(config, variant, out, ctx)
            # every round of the shipped setting is evaluated; baselines by their final model
            out[stages.MODELS] |= trained if variant == "dpo" else {variant: trained[variant]}
            out[variant] = trained[variant]
        results = out["evaluate"] = run_stage("evaluate", config, ctx, out)
        if stages.get("promote").runs(config):  # registry state changes between runs: never cached
            results["promotion"] = run_stage("promote", config, ctx, out)
        results["report"] = run_stage("report", config, ctx, out)
    return {"parent_run_id": parent.run_id, "experiment_id": parent.experiment_id, **results}
