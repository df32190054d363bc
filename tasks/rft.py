"""Baseline stage `rft`: rejection-sampling fine-tuning, i.e. TRL's SFTTrainer on the chosen answers of
the preference pairs only, with the DPO section's optimiser settings. It tells whether DPO's use of
the rejected answers pays beyond simply imitating the chosen ones.
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import DPOSection
from alignflow.models.loading import attn_implementation
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, stage_run
from alignflow.training.args import build_trl_config, trainer_args
from alignflow.training.run import TrainJob, check_launch
from alignflow.training.trainers import TRAINERS
from tasks import preference_inputs, train_and_save
from tasks.caching import stage_dir
from tasks.dpo import PREFERENCE_INPUTS
from tasks.stages import Stage, register


def sft_fields(args: dict) -> dict:
    """The DPO section's trainer arguments that mean the same to SFTConfig: shared optimiser and batch
    fields carry over; DPO's loss fields mean something else to SFTConfig and are left out."""
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)} - {"loss_type", "loss_weights"}
    return {k: v for k, v in args.items() if k in known}


def rft_args(cfg: DPOSection, device: str, seed: int, out_dir) -> dict:
    attn = attn_implementation(cfg.attn_implementation, device)
    return sft_fields(trainer_args(cfg.trainer, device, seed, out_dir, cfg.checkpoint_steps, TRAINERS["rft"].config,
                                   attn, cfg.launch.mixed_precision))


def check(config, device: str, out_dir) -> None:
    build_trl_config("rft", TRAINERS["rft"].config, rft_args(config.dpo, device, config.seed, out_dir))
    check_launch("dpo", config.dpo.launch, device)


@task(name="rft", cache_policy=NONE)
def rft(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, name: str = "rft",
        cache_key: str | None = None) -> ModelRef:
    out_dir = stage_dir(ctx, name, cache_key)
    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    args = rft_args(cfg, ctx.device, ctx.seed, out_dir / "trainer")
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "launch": cfg.launch.model_dump(),
                      "policy": policy.uri, "variant": "rft", "attn_implementation": attn}, "dpo")
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows_path, policy_path, tokenizer = preference_inputs(policy, pairs, name)
        job = TrainJob(stage=name, trainer="rft", rows=rows_path, model=policy_path, device=ctx.device, args=args,
                       run_id=run_id, model_dir=str(out_dir / "model"), attn=attn,
                       trust_remote_code=policy.trust_remote_code,
                       lora=cfg.lora.model_dump() if cfg.lora.enabled else None, merge_adapter=True)
        return train_and_save(job, cfg, tokenizer, policy)


register(Stage(name="rft", task=rft, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS,
               evaluated_as="rft", trains=True, baseline_of="dpo",
               enabled=lambda config: "rft" in config.dpo.baselines, check=check,
               describe="baseline: SFT on the chosen answers only (rejection-sampling fine-tuning)"))
