"""Stage 7: register the SFT and DPO models in the MLflow Model Registry and decide on promotion.

    alignflow stage promote --from-run RUN_ID      # decide again on a run's (or a rerun's) evaluation

The new DPO model (or `registry.candidate`, a baseline such as `grpo`) takes the alias `challenger`. It is
**refused** when, on the evaluation's held-out prompts, it is worse than its own SFT model or degenerate next
to it (alignflow.health.promotion_refusals: accuracy or win-rate interval, EOS rate, repetition rate, answer
length, against `registry.*` limits); a refused model is registered but never champion, the first of a
registered name included. Otherwise `champion` moves to it only if the lower bound of the 95% paired-bootstrap
interval of (challenger accuracy - champion accuracy) is above `registry.min_gain`; the champion is evaluated
here on the same prompts, so a changed eval set cannot favour either. The first unrefused DPO model of a name
becomes champion. The decision, its reasons and numbers go to this stage's run, the parent run (`promotion.*`
metrics, `alignflow.promotion` and `alignflow.promotion_reason` tags), the challenger's model-version tags
and the run report.
"""

from __future__ import annotations

import mlflow
import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import EvalSection, RegistrySection
from alignflow.data.records import read_jsonl
from alignflow.health import promotion_refusals
from alignflow.refs import DatasetRef, ModelRef
from alignflow.stats import bootstrap_ci, correctness
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, stage_run
from alignflow.tracking.model_registry import alias_version, register_model, version_model_dir
from tasks import stage_logger
from tasks.answers import answer
from tasks.stages import MODELS, Stage, register


def registry_names(cfg: RegistrySection, experiment: str) -> tuple[str, str]:
    return cfg.sft_model or f"{experiment}-sft", cfg.dpo_model or f"{experiment}-{cfg.candidate}"


def check(config, device: str, out_dir) -> None:
    """The candidate is a model this config trains and evaluates (dpo, or a baseline it runs)."""
    from tasks import stages

    trained = ["dpo"] + [name for name in stages.baselines("dpo") if stages.get(name).runs(config)]
    labels = [stages.get(name).evaluated_as for name in trained]
    if config.registry.candidate not in labels:
        raise ValueError(f"registry.candidate: {config.registry.candidate!r} is not a model this config trains; "
                         f"choose from {labels} (a baseline runs when dpo.baselines lists it)")


@task(name="promote", cache_policy=NONE)
def promote(cfg: RegistrySection, experiment: str, models: dict[str, ModelRef], data: DatasetRef,
            eval_cfg: EvalSection, evaluation: dict, ctx: RunContext) -> dict:
    """`models`: every evaluated model by label (the challenger is `cfg.candidate`'s, dpo by default);
    `evaluation`: the evaluate stage's results, whose metrics of the candidate and `sft` decide whether the
    challenger is refused, and whose per-prompt correctness of the candidate is compared with the champion's."""
    from mlflow.tracking import MlflowClient

    sft_model, dpo_model = models["sft"], models[cfg.candidate]
    # absent: the eval prompts have no references
    challenger_correct = evaluation.get("correct", {}).get(cfg.candidate)
    refusals = promotion_refusals(evaluation["metrics"][cfg.candidate], evaluation["metrics"].get("sft"), cfg)
    logger = stage_logger()
    sft_name, dpo_name = registry_names(cfg, experiment)
    client = MlflowClient()
    with stage_run(ctx, "promote", flatten(cfg, "registry")) as run_id:
        rows = read_jsonl(data.resolve())
        log_dataset(rows, source=data.uri, name="eval", context="promotion")
        sft_version = register_model(sft_model, sft_name, ctx.parent_run_id)
        challenger = register_model(dpo_model, dpo_name, ctx.parent_run_id)
        champion = alias_version(dpo_name, "champion")
        client.set_registered_model_alias(dpo_name, "challenger", challenger.version)
        decision = {"model": dpo_name, "candidate": cfg.candidate, "challenger_version": int(challenger.version),
                    "sft_model": sft_name, "sft_version": int(sft_version.version)}
        if refusals:
            promoted = False
            decision |= {"decision": "refused", "reasons": refusals}
            if champion is not None:
                decision["champion_version"] = int(champion.version)
        elif challenger_correct is None and champion is not None:
            promoted = False
            decision |= {"decision": "kept champion (no reference answers to compare accuracy on)",
                         "champion_version": int(champion.version)}
        elif champion is None or str(champion.version) == str(challenger.version):
            promoted = champion is None
            decision |= {"decision": "first champion" if promoted else "already champion",
                         "champion_version": int(challenger.version)}
        else:
            # the champion was trained from the same base family: its code trust is the challenger's
            _, answers, _ = answer(eval_cfg, dpo_model.model_copy(update={"chat_template": None}),
                                   [r["prompt"] for r in rows], ctx.device, f"champion v{champion.version}",
                                   path=version_model_dir(champion), stage="promote")
            champion_correct = correctness(rows, answers)
            diff = np.asarray(challenger_correct) - champion_correct
            low, high = bootstrap_ci(diff, eval_cfg.bootstrap or 1000, ctx.seed)
            promoted = low > cfg.min_gain
            decision |= {"decision": "promoted" if promoted else "kept champion",
                         "champion_version": int(challenger.version if promoted else champion.version),
                         "previous_champion_version": int(champion.version),
                         "champion_accuracy": float(champion_correct.mean()),
                         "challenger_accuracy": float(np.mean(challenger_correct)),
                         "delta": float(diff.mean()), "delta_ci95_low": low, "delta_ci95_high": high}
        if promoted:
            client.set_registered_model_alias(dpo_name, "champion", challenger.version)
        numbers = {f"promotion.{k}": float(v) for k, v in decision.items() if isinstance(v, (int, float))}
        numbers["promotion.promoted"] = float(promoted)
        log_metrics(run_id, numbers)
        log_metrics(ctx.parent_run_id, numbers)
        tags = {"alignflow.promotion": decision["decision"]}
        if refusals:
            tags["alignflow.promotion_reason"] = "\n".join(refusals)
        for key, value in tags.items():
            mlflow.set_tag(key, value)
            client.set_tag(ctx.parent_run_id, key, value)
            client.set_model_version_tag(dpo_name, challenger.version, key, value)
        if not refusals and "alignflow.promotion_reason" in challenger.tags:  # refused by an earlier decision
            client.delete_model_version_tag(dpo_name, challenger.version, "alignflow.promotion_reason")
        if refusals:
            logger.warning("promotion: %s v%s refused, not champion: %s", dpo_name, challenger.version,
                           "; ".join(refusals))
        logger.info("promotion: %s (%s v%s)%s", decision["decision"], dpo_name, challenger.version,
                    f", delta {decision['delta']:+.3f} [{decision['delta_ci95_low']:.3f}, "
                    f"{decision['delta_ci95_high']:.3f}] vs v{decision['previous_champion_version']}"
                    if "delta" in decision else "")
        return decision


register(Stage(name="promote", task=promote,
                     config={"cfg": "registry", "experiment": "experiment", "eval_cfg": "eval"},
                     inputs={"models": MODELS, "data": "load_data.eval", "evaluation": "evaluate"},
                     check=check,
                     cache=False,  # the registry's state changes between runs
                     enabled=lambda config: config.registry.enabled,
                     describe="register SFT and DPO models; refuse a DPO model worse than its SFT model or "
                              "degenerate; move `champion` only on a significant gain"))
