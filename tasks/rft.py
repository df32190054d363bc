"""Baseline stage `rft`: rejection-sampling fine-tuning, i.e. TRL's SFTTrainer on the chosen answers of
the preference pairs only, with the DPO section's optimiser settings. It tells whether DPO's use of
the rejected answers pays beyond simply imitating the chosen ones.
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.cache_policies import NONE

from alignflow.caching import stage_dir
from alignflow.config import DPOSection
from alignflow.modeling import (attn_implementation, build_trl_config, load_causal_lm, lora_config, trainer_args)
from alignflow.refs import DatasetRef, ModelRef
from alignflow.stages import Stage, register
from alignflow.tracking import MlflowMetricsCallback, RunContext, flatten, log_params, stage_run
from alignflow.training import active_paths, lora_targets, rft_trainer
from tasks import CheckpointMarker, preference_inputs, save_trained_model, stage_logger, train_resumable
from tasks.dpo import PREFERENCE_INPUTS


def sft_fields(args: dict) -> dict:
    """The DPO section's trainer arguments that mean the same to SFTConfig: shared optimiser and batch
    fields carry over; DPO's loss fields mean something else to SFTConfig and are left out."""
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)} - {"loss_type", "loss_weights"}
    return {k: v for k, v in args.items() if k in known}


def rft_args(cfg: DPOSection, device: str, seed: int, out_dir) -> dict:
    attn = attn_implementation(cfg.attn_implementation, device)
    return sft_fields(trainer_args(cfg.trainer, device, seed, out_dir, cfg.checkpoint_steps, "SFTConfig", attn))


def check(config, device: str, out_dir) -> None:
    build_trl_config("rft", "SFTConfig", rft_args(config.dpo, device, config.seed, out_dir))


@task(name="rft", cache_policy=NONE)
def rft(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, name: str = "rft",
        cache_key: str | None = None) -> ModelRef:
    out_dir = stage_dir(ctx, name, cache_key)
    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    args = rft_args(cfg, ctx.device, ctx.seed, out_dir / "trainer")
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "policy": policy.uri, "variant": "rft",
                      "attn_implementation": attn}, "dpo")
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows, policy_path, tokenizer = preference_inputs(policy, pairs, name)
        model = load_causal_lm(policy_path, ctx.device, attn=attn, trust_remote_code=policy.trust_remote_code)
        trainer = rft_trainer(model, tokenizer, rows, args, lora_config(cfg.lora) if cfg.lora.enabled else None,
                              [MlflowMetricsCallback(run_id), CheckpointMarker()])
        log_params(run_id, flatten({"active": active_paths(trainer, trainer.model),
                                    "lora.resolved_targets": lora_targets(trainer.model)}, "dpo"))
        result = train_resumable(trainer, args["output_dir"], name)
        stage_logger().info("%s done: %d steps, train loss %.4f", name, result.global_step, result.training_loss)
        return save_trained_model(trainer, tokenizer, out_dir / "model", run_id, policy, cfg.lora.enabled,
                                  merge_adapter=True)


register(Stage(name="rft", task=rft, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS,
               evaluated_as="rft", trains=True, baseline_of="dpo",
               enabled=lambda config: "rft" in config.dpo.baselines, check=check,
               describe="baseline: SFT on the chosen answers only (rejection-sampling fine-tuning)"))
