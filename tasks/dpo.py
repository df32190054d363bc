"""Stage 5: preference tuning with TRL's DPOTrainer; the reference model is the policy it starts from.

With LoRA the reference is the starting policy with the adapter disabled; with precomputed reference
log-probs TRL scores the starting policy before training; otherwise a second copy is passed
explicitly, since TRL would reload the reference from the policy's `name_or_path`, which for a
merged adapter is the base model.

The same stage trains the two baselines the preference setting is judged against, on the same pairs:
`rft` (rejection-sampling fine-tuning: TRL's SFTTrainer on the chosen answers only, with the DPO
section's optimiser settings) and `dpo_no_sft` (the configured DPO minus its `sft` loss term).
"""

from __future__ import annotations

import dataclasses

from datasets import Dataset
from prefect import task
from prefect.cache_policies import NONE

from alignflow.caching import stage_dir
from alignflow.config import DPOSection
from alignflow.data import read_jsonl
from alignflow.modeling import load_causal_lm, load_tokenizer, lora_config, trainer_args
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import MlflowMetricsCallback, RunContext, flatten, log_dataset, stage_run
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
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    if variant not in VARIANTS:
        raise ValueError(f"unknown preference variant {variant!r}; choose from {VARIANTS}")
    out_dir = stage_dir(ctx, name, cache_key)
    args = variant_args(trainer_args(cfg.trainer, ctx.device, ctx.seed, out_dir / "trainer", cfg.checkpoint_steps),
                        variant)
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "policy": policy.uri, "variant": variant},
                     "dpo")
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows = read_jsonl(pairs.resolve())
        log_dataset(rows, source=pairs.uri, name="pairs", context="training")
        policy_path = policy.resolve()
        tokenizer = load_tokenizer(policy_path)
        model = load_causal_lm(policy_path, ctx.device)
        peft = lora_config(cfg.lora) if cfg.lora.enabled else None
        callbacks = [MlflowMetricsCallback(run_id), CheckpointMarker()]
        if variant == "rft":
            train = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
            trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=train, processing_class=tokenizer,
                                 peft_config=peft, callbacks=callbacks)
        else:
            # TRL scores the reference with the starting policy itself when it precomputes log-probs
            # (or disables the adapter under LoRA); only otherwise is a second copy needed.
            own_ref = cfg.lora.enabled or args.get("precompute_ref_log_probs")
            ref_model = None if own_ref else load_causal_lm(policy_path, ctx.device)
            train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**args), train_dataset=train,
                                 processing_class=tokenizer, callbacks=callbacks, peft_config=peft)
        result = train_resumable(trainer, args["output_dir"], name)
        stage_logger().info("%s (%s) done: %d steps, train loss %.4f", name, variant, result.global_step,
                            result.training_loss)
        return save_trained_model(trainer, tokenizer, out_dir / "model", run_id, cfg.lora.enabled)
