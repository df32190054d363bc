"""Stage 2: supervised fine-tuning with TRL's SFTTrainer, full or LoRA, on CPU or CUDA, in the stage's
process or launched on several (`sft.launch`, alignflow.training.run).

Loss falls on the answer only (TRL's completion-only loss on prompt/completion data), and the
answer ends with the chat template's end-of-turn token, so the tuned model learns to stop.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import SFTSection
from alignflow.data.records import read_jsonl
from alignflow.models.loading import attn_implementation, load_tokenizer
from alignflow.models.templates import check_template
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, log_dataset, stage_run
from alignflow.training.args import build_trl_config, trainer_args
from alignflow.training.run import TrainJob, check_launch
from alignflow.training.trainers import TRAINERS
from tasks import train_and_save
from tasks.caching import stage_dir
from tasks.stages import Stage, register


def sft_args(cfg: SFTSection, device: str, seed: int, out_dir) -> dict:
    """SFTConfig's arguments: alignflow's per-device defaults, then the section's `trainer:` keys."""
    attn = attn_implementation(cfg.attn_implementation, device)
    return trainer_args(cfg.trainer, device, seed, out_dir, cfg.checkpoint_steps, TRAINERS["sft"].config, attn,
                        cfg.launch.mixed_precision)


def check(config, device: str, out_dir) -> None:
    build_trl_config("sft", TRAINERS["sft"].config, sft_args(config.sft, device, config.seed, out_dir))
    check_launch("sft", config.sft.launch, device)


@task(name="sft", cache_policy=NONE)
def sft(cfg: SFTSection, base: ModelRef, data: DatasetRef, ctx: RunContext, cache_key: str | None = None
        ) -> ModelRef:
    out_dir = stage_dir(ctx, "sft", cache_key)
    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    args = sft_args(cfg, ctx.device, ctx.seed, out_dir / "trainer")
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "launch": cfg.launch.model_dump(),
                      "base": base.uri, "attn_implementation": attn}, "sft")
    with stage_run(ctx, "sft", params, cache_key) as run_id:
        rows_path = data.resolve()
        log_dataset(read_jsonl(rows_path), source=data.uri, name="sft", context="training")
        base_path = base.resolve()
        tokenizer = load_tokenizer(base_path, base.trust_remote_code)
        check_template(tokenizer, base.chat_template, "sft", f"base model {base.uri}")
        job = TrainJob(stage="sft", trainer="sft", rows=str(rows_path), model=base_path, device=ctx.device,
                       args=args, run_id=run_id, model_dir=str(out_dir / "model"), attn=attn,
                       trust_remote_code=base.trust_remote_code,
                       lora=cfg.lora.model_dump() if cfg.lora.enabled else None)
        return train_and_save(job, cfg, tokenizer, base)


register(Stage(name="sft", task=sft, config={"cfg": "sft"}, inputs={"base": "select_base", "data": "load_data.sft"},
               evaluated_as="sft", trains=True, check=check, describe="supervised fine-tuning (TRL SFTTrainer)"))
