"""Stage 5: preference tuning with TRL's DPOTrainer; the reference model is the SFT model.

With LoRA the reference is the SFT model with the adapter disabled (no second copy); without it,
a second copy of the SFT model is passed explicitly, since TRL would otherwise reload the
reference from the policy's `name_or_path`, which for a merged adapter is the base model.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import DPOSection
from alignflow.data import read_jsonl
from alignflow.modeling import load_causal_lm, load_tokenizer, lora_config, trainer_args
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import MlflowMetricsCallback, RunContext, flatten, log_dataset, stage_run
from tasks import save_trained_model, stage_logger


@task(name="dpo", cache_policy=NONE)
def dpo(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext) -> ModelRef:
    from trl import DPOConfig, DPOTrainer

    out_dir = Path(ctx.output_dir) / "dpo"
    args = trainer_args(cfg.trainer, ctx.device, ctx.seed, out_dir / "trainer")
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "policy": policy.uri}, "dpo")
    with stage_run(ctx, "dpo", params) as run_id:
        rows = read_jsonl(pairs.resolve())
        log_dataset(rows, source=pairs.uri, name="pairs", context="training")
        policy_path = policy.resolve()
        tokenizer = load_tokenizer(policy_path)
        model = load_causal_lm(policy_path, ctx.device)
        ref_model = None if cfg.lora.enabled else load_causal_lm(policy_path, ctx.device)
        train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**args), train_dataset=train,
                             processing_class=tokenizer, callbacks=[MlflowMetricsCallback(run_id)],
                             peft_config=lora_config(cfg.lora) if cfg.lora.enabled else None)
        result = trainer.train()
        stage_logger().info("DPO done: %d steps, train loss %.4f", result.global_step, result.training_loss)
        return save_trained_model(trainer, tokenizer, out_dir / "model", run_id, cfg.lora.enabled)
