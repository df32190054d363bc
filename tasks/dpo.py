"""Stage 5: preference tuning with TRL's DPOTrainer; the reference model is the policy it starts from
(alignflow.training.dpo_trainer says how, with and without LoRA).

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
from alignflow.models.loading import attn_implementation
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, stage_run
from alignflow.training.args import build_trl_config, needs_ref_copy, trainer_args
from alignflow.training.run import TrainJob, check_launch
from alignflow.training.trainers import TRAINERS
from tasks import preference_inputs, train_and_save
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
    attn = attn_implementation(cfg.attn_implementation, device)
    args = trainer_args(cfg.trainer, device, seed, out_dir, cfg.checkpoint_steps, TRAINERS["dpo"].config, attn,
                        cfg.launch.mixed_precision)
    return without_sft_term(args) if variant == "dpo_no_sft" else args


def check(variant: str):
    def build(config, device: str, out_dir) -> None:
        build_trl_config(variant, TRAINERS["dpo"].config, dpo_args(config.dpo, device, config.seed, out_dir, variant))
        check_launch("dpo", config.dpo.launch, device)
    return build


@task(name="dpo", cache_policy=NONE)
def dpo(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, name: str = "dpo",
        variant: str = "dpo", cache_key: str | None = None) -> ModelRef:
    out_dir = stage_dir(ctx, name, cache_key)
    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    args = dpo_args(cfg, ctx.device, ctx.seed, out_dir / "trainer", variant)
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "launch": cfg.launch.model_dump(),
                      "policy": policy.uri, "variant": variant, "attn_implementation": attn}, "dpo")
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows_path, policy_path, tokenizer = preference_inputs(policy, pairs, name)
        job = TrainJob(stage=name, trainer="dpo", rows=rows_path, model=policy_path, device=ctx.device, args=args,
                       run_id=run_id, model_dir=str(out_dir / "model"), attn=attn,
                       trust_remote_code=policy.trust_remote_code,
                       lora=cfg.lora.model_dump() if cfg.lora.enabled else None,
                       ref_copy=needs_ref_copy(args, cfg.lora.enabled), merge_adapter=True)
        return train_and_save(job, cfg, tokenizer, policy)


# the pairs: ranked from the SFT model's samples, or else (dpo.data alone) the user's own preference data
PREFERENCE_INPUTS = {"policy": "sft", "pairs": "rank|load_data.preference"}
register(Stage(name="dpo", task=dpo, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS, evaluated_as="dpo",
               trains=True, check=check("dpo"), describe="preference tuning (TRL DPOTrainer)"))
register(Stage(name="dpo_no_sft", task=dpo, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS,
               fixed={"variant": "dpo_no_sft", "name": "dpo_no_sft"}, evaluated_as="dpo_no_sft", trains=True,
               baseline_of="dpo", enabled=lambda config: "dpo_no_sft" in config.dpo.baselines,
               check=check("dpo_no_sft"), describe="baseline: the DPO stage minus its SFT loss term"))
