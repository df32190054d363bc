"""Stage 2: supervised fine-tuning with TRL's SFTTrainer, full or LoRA, on CPU or CUDA, in the stage's
process or launched on several (`sft.launch`, alignflow.training.run).

Loss falls on the answer only (TRL's completion-only loss on prompt/completion data), and the
answer ends with the chat template's end-of-turn token, so the tuned model learns to stop.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import SFTSection
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext
from tasks import check_training, instruction_inputs, train_stage, trainer_arguments
from tasks.caching import stage_dir
from tasks.stages import Stage, register


def check(config, device: str, out_dir) -> None:
    args = trainer_arguments(config.sft, "sft", device, config.seed, out_dir)
    check_training("sft", "sft", args, "sft", config.sft.launch, device)


@task(name="sft", cache_policy=NONE)
def sft(cfg: SFTSection, base: ModelRef, data: DatasetRef, ctx: RunContext, cache_key: str | None = None
        ) -> ModelRef:
    out_dir = stage_dir(ctx, "sft", cache_key)
    args = trainer_arguments(cfg, "sft", ctx.device, ctx.seed, out_dir / "trainer")
    return train_stage(ctx, "sft", "sft", cfg, "sft", args, base, out_dir, cache_key,
                       inputs=lambda: instruction_inputs(base, data, "sft"), params={"base": base.uri})


register(Stage(name="sft", task=sft, config={"cfg": "sft"}, inputs={"base": "select_base", "data": "load_data.sft"},
               evaluated_as="sft", trains=True, check=check, describe="supervised fine-tuning (TRL SFTTrainer)"))
