"""Stage 5: preference tuning with TRL's DPOTrainer; the reference model is the policy it starts from
(alignflow.training.dpo_trainer says how, with and without LoRA).

The output always reloads as the policy it started from plus what this stage learned: a LoRA
adapter is merged into that policy and saved as full weights, since the policy may itself be a LoRA
SFT merged into its base when it loaded (an adapter saved alone would name the base beneath it).

The same stage trains the two baselines the preference setting is judged against, on the same pairs:
`rft` (rejection-sampling fine-tuning: TRL's SFTTrainer on the chosen answers only, with the DPO
section's optimiser settings) and `dpo_no_sft` (the configured DPO minus its `sft` loss term).
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.cache_policies import NONE

from alignflow.caching import stage_dir
from alignflow.config import DPOSection
from alignflow.data import read_jsonl
from alignflow.modeling import (attn_implementation, check_template, load_causal_lm, load_tokenizer, lora_config,
                                trainer_args)
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import MlflowMetricsCallback, RunContext, flatten, log_dataset, log_params, stage_run
from alignflow.training import active_paths, dpo_trainer, lora_targets, needs_ref_copy, rft_trainer
from tasks import CheckpointMarker, save_trained_model, stage_logger, train_resumable

VARIANTS = ("dpo", "rft", "dpo_no_sft")


def variant_args(args: dict, variant: str) -> dict:
    """The trainer arguments a variant trains with, derived from the DPO section's."""
    if variant == "dpo_no_sft":
        losses = args.get("loss_type", ["sigmoid"])
        losses = [losses] if isinstance(losses, str) else list(losses)
        weights = args.get("loss_weights")
        keep = [i for i, loss in enumerate(losses) if loss != "sft"] or [0]
        args = {**args, "loss_type": [losses[i] if losses[i] != "sft" else "sigmoid" for i in keep]}
        if weights is not None:
            args["loss_weights"] = [weights[i] for i in keep]
    elif variant == "rft":
        from trl import SFTConfig

        # shared optimiser/batch fields carry over; DPO's loss fields mean something else to SFTConfig
        sft_fields = {f.name for f in dataclasses.fields(SFTConfig)} - {"loss_type", "loss_weights"}
        args = {k: v for k, v in args.items() if k in sft_fields}
    return args


@task(name="dpo", cache_policy=NONE)
def dpo(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, name: str = "dpo",
        variant: str = "dpo", cache_key: str | None = None) -> ModelRef:
    if variant not in VARIANTS:
        raise ValueError(f"unknown preference variant {variant!r}; choose from {VARIANTS}")
    out_dir = stage_dir(ctx, name, cache_key)
    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    trl_config = "SFTConfig" if variant == "rft" else "DPOConfig"
    args = variant_args(trainer_args(cfg.trainer, ctx.device, ctx.seed, out_dir / "trainer", cfg.checkpoint_steps,
                                     trl_config, attn), variant)
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "policy": policy.uri, "variant": variant,
                      "attn_implementation": attn}, "dpo")
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows = read_jsonl(pairs.resolve())
        log_dataset(rows, source=pairs.uri, name="pairs", context="training")
        policy_path = policy.resolve()
        tokenizer = load_tokenizer(policy_path)
        check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
        check_template(tokenizer, pairs.chat_template, name, f"the sampling of pairs {pairs.uri}")
        model = load_causal_lm(policy_path, ctx.device, attn=attn)
        peft = lora_config(cfg.lora) if cfg.lora.enabled else None
        callbacks = [MlflowMetricsCallback(run_id), CheckpointMarker()]
        if variant == "rft":
            trainer = rft_trainer(model, tokenizer, rows, args, peft, callbacks)
        else:
            ref_model = load_causal_lm(policy_path, ctx.device, attn=attn) if needs_ref_copy(args, cfg.lora.enabled) \
                else None
            trainer = dpo_trainer(model, tokenizer, rows, args, peft, ref_model, callbacks)
        log_params(run_id, flatten({"active": active_paths(trainer, trainer.model),
                                    "lora.resolved_targets": lora_targets(trainer.model)}, "dpo"))
        result = train_resumable(trainer, args["output_dir"], name)
        stage_logger().info("%s (%s) done: %d steps, train loss %.4f", name, variant, result.global_step,
                            result.training_loss)
        return save_trained_model(trainer, tokenizer, out_dir / "model", run_id, cfg.lora.enabled,
                                  merge_adapter=True)
