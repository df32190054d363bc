"""Stage 2: supervised fine-tuning with TRL's SFTTrainer, full or LoRA, on CPU or CUDA.

Loss falls on the answer only (TRL's completion-only loss on prompt/completion data), and the
answer ends with the chat template's end-of-turn token, so the tuned model learns to stop.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from alignflow.caching import stage_dir
from alignflow.config import SFTSection
from alignflow.data import read_jsonl
from alignflow.modeling import (attn_implementation, build_trl_config, check_template, load_causal_lm, load_tokenizer,
                                lora_config, trainer_args)
from alignflow.refs import DatasetRef, ModelRef
from alignflow.stages import Stage, register
from alignflow.tracking import MlflowMetricsCallback, RunContext, flatten, log_dataset, log_params, stage_run
from alignflow.training import active_paths, lora_targets, sft_trainer
from tasks import CheckpointMarker, save_trained_model, stage_logger, train_resumable


def sft_args(cfg: SFTSection, device: str, seed: int, out_dir) -> dict:
    """SFTConfig's arguments: alignflow's per-device defaults, then the section's `trainer:` keys."""
    attn = attn_implementation(cfg.attn_implementation, device)
    return trainer_args(cfg.trainer, device, seed, out_dir, cfg.checkpoint_steps, "SFTConfig", attn)


def check(config, device: str, out_dir) -> None:
    build_trl_config("sft", "SFTConfig", sft_args(config.sft, device, config.seed, out_dir))


@task(name="sft", cache_policy=NONE)
def sft(cfg: SFTSection, base: ModelRef, data: DatasetRef, ctx: RunContext, cache_key: str | None = None
        ) -> ModelRef:
    out_dir = stage_dir(ctx, "sft", cache_key)
    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    args = sft_args(cfg, ctx.device, ctx.seed, out_dir / "trainer")
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "base": base.uri, "attn_implementation": attn},
                     "sft")
    with stage_run(ctx, "sft", params, cache_key) as run_id:
        rows = read_jsonl(data.resolve())
        log_dataset(rows, source=data.uri, name="sft", context="training")
        base_path = base.resolve()
        tokenizer = load_tokenizer(base_path, base.trust_remote_code)
        check_template(tokenizer, base.chat_template, "sft", f"base model {base.uri}")
        model = load_causal_lm(base_path, ctx.device, trust_remote_code=base.trust_remote_code, attn=attn)
        trainer = sft_trainer(model, tokenizer, rows, args, lora_config(cfg.lora) if cfg.lora.enabled else None,
                              [MlflowMetricsCallback(run_id), CheckpointMarker()])
        log_params(run_id, flatten({"active": active_paths(trainer, trainer.model),
                                    "lora.resolved_targets": lora_targets(trainer.model)}, "sft"))
        result = train_resumable(trainer, args["output_dir"], "sft")
        stage_logger().info("SFT done: %d steps, train loss %.4f", result.global_step, result.training_loss)
        return save_trained_model(trainer, tokenizer, out_dir / "model", run_id, base, cfg.lora.enabled)


register(Stage(name="sft", task=sft, config={"cfg": "sft"}, inputs={"base": "select_base", "data": "load_data.sft"},
               evaluated_as="sft", trains=True, check=check, describe="supervised fine-tuning (TRL SFTTrainer)"))
