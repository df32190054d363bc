"""Stage 5: preference tuning with TRL's DPOTrainer; the reference model is the policy it starts from
(alignflow.training.trainers.dpo_trainer says how, with and without LoRA).

The output always reloads as the policy it started from plus what this stage learned: a LoRA
adapter is merged into that policy and saved as full weights, since the policy may itself be a LoRA
SFT merged into its base when it loaded (an adapter saved alone would name the base beneath it).

Two stages are declared here: `dpo`, and its baseline `dpo_no_sft` (the configured DPO minus any
`sft` loss term, on the same pairs). The other baseline, `rft`, is tasks/rft.py.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import DPOSection
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext
from alignflow.training.args import needs_ref_copy
from tasks import check_training, preference_inputs, train_stage, trainer_arguments
from tasks.caching import stage_dir
from tasks.stages import Stage, register


def without_sft_term(args: dict) -> dict:
    """The DPO trainer arguments minus any `sft` loss term (the `dpo_no_sft` baseline)."""
    losses = args.get("loss_type", ["sigmoid"])
    losses = [losses] if isinstance(losses, str) else list(losses)
    weights = args.get("loss_weights")
    keep = [i for i, loss in enumerate(losses) if loss != "sft"] or [0]
    args = {**args, "loss_type": [losses[i] if losses[i] != "sft" else "sigmoid" for i in keep]}
    if weights is not None:
        args["loss_weights"] = [weights[i] for i in keep]
    return args


def dpo_args(cfg: DPOSection, device: str, seed: int, out_dir, variant: str = "dpo") -> dict:
    args = trainer_arguments(cfg, "dpo", device, seed, out_dir)
    return without_sft_term(args) if variant == "dpo_no_sft" else args


def check(variant: str):
    def build(config, device: str, out_dir) -> None:
        args = dpo_args(config.dpo, device, config.seed, out_dir, variant)
        check_training(variant, "dpo", args, "dpo", config.dpo.launch, device)
    return build


@task(name="dpo", cache_policy=NONE)
def dpo(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, name: str = "dpo",
        variant: str = "dpo", cache_key: str | None = None) -> ModelRef:
    out_dir = stage_dir(ctx, name, cache_key)
    args = dpo_args(cfg, ctx.device, ctx.seed, out_dir / "trainer", variant)
    return train_stage(ctx, name, "dpo", cfg, "dpo", args, policy, out_dir, cache_key,
                       inputs=lambda: preference_inputs(policy, pairs, name),
                       params={"policy": policy.uri, "variant": variant},
                       ref_copy=needs_ref_copy(args, cfg.lora.enabled), merge_adapter=True)


# the pairs: ranked from the SFT model's samples, or else (dpo.data alone) the user's own preference data
PREFERENCE_INPUTS = {"policy": "sft", "pairs": "rank|load_data.preference"}
register(Stage(name="dpo", task=dpo, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS, evaluated_as="dpo",
               trains=True, check=check("dpo"), describe="preference tuning (TRL DPOTrainer)"))
register(Stage(name="dpo_no_sft", task=dpo, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS,
               fixed={"variant": "dpo_no_sft", "name": "dpo_no_sft"}, evaluated_as="dpo_no_sft", trains=True,
               baseline_of="dpo", enabled=lambda config: "dpo_no_sft" in config.dpo.baselines,
               check=check("dpo_no_sft"), describe="baseline: the DPO stage minus its SFT loss term"))
