"""What TRL's trainers are given: per-device defaults (CPU, CUDA), the TRL config built from a section's
`trainer` keys, LoRA's config and target modules.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

CPU_TRAINER_DEFAULTS = {
    # TRL's bf16 and gradient checkpointing defaults fail or crawl on CPU (measured: 8.9k vs 13.8k tok/s).
    "bf16": False,
    "fp16": False,
    "activation_checkpointing": False,  # transformers' name for gradient checkpointing (the old one is deprecated)
    "use_cpu": True,
    "dataloader_pin_memory": False,
}


def cuda_trainer_defaults(trl_config: str, user: dict[str, Any], attn: str, bf16: bool | None = None
                          ) -> dict[str, Any]:
    """What a user of a CUDA card expects unless the config says otherwise: bf16 where the card has it,
    Liger's fused kernels for SFT when installed (`pip install alignflow[gpu]`), no torch.compile (minutes of
    compilation for short runs), and for SFT padding-free batches when a FlashAttention kernel can keep
    the flattened sequences apart. TRL enforces `max_length` only on padded batches, so a config that
    sets it keeps padding (TRL 1.16's DPOTrainer has padding-free disabled)."""
    import importlib.util

    if bf16 is None:  # `bf16` given: what a card with or without bf16 would get (bench/device_check.py)
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # TRL's own default (checkpointing on), under transformers' name: TRL sets the deprecated one
    defaults: dict[str, Any] = {"bf16": bf16, "fp16": not bf16, "torch_compile": False,
                                "activation_checkpointing": True}
    if trl_config == "SFTConfig":  # TRL 1.16 deprecates Liger in its DPOTrainer (for Hub kernels)
        defaults["use_liger_kernel"] = importlib.util.find_spec("liger_kernel") is not None
    if trl_config == "SFTConfig" and attn.startswith("flash_attention") and "max_length" not in user \
            and not user.get("packing"):
        defaults |= {"padding_free": True, "max_length": None}
    return defaults


def trainer_args(user: dict[str, Any], device: str, seed: int, output_dir: Path, checkpoint_steps: int = 0,
                 trl_config: str = "SFTConfig", attn: str = "sdpa", mixed_precision: str | None = None
                 ) -> dict[str, Any]:
    """TRL config kwargs: alignflow's per-device defaults, then the user's `trainer:` keys on top.
    `checkpoint_steps` > 0 saves a resumable checkpoint every that many optimizer steps (the last two kept);
    `mixed_precision` (a launch's: no | fp16 | bf16) sets bf16/fp16 unless `trainer:` does."""
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": seed,
        "report_to": "none",  # alignflow logs TRL's metrics itself, batched, into the stage's run
        "save_strategy": "steps" if checkpoint_steps else "no",
        "logging_steps": 5,
        "disable_tqdm": False,
    }
    if checkpoint_steps:
        defaults |= {"save_steps": checkpoint_steps, "save_total_limit": 2}
    if device == "cpu":
        defaults |= CPU_TRAINER_DEFAULTS
    else:
        defaults |= cuda_trainer_defaults(trl_config, user, attn)
    if mixed_precision:
        defaults |= {"bf16": mixed_precision == "bf16", "fp16": mixed_precision == "fp16"}
    if "gradient_checkpointing" in user and "activation_checkpointing" not in user:  # the user's, by its old name
        defaults["activation_checkpointing"] = user["gradient_checkpointing"]
    if not _has_activation_checkpointing():  # transformers before the rename
        defaults["gradient_checkpointing"] = defaults.pop("activation_checkpointing")
    return defaults | user


@functools.lru_cache(maxsize=1)
def _has_activation_checkpointing() -> bool:
    from transformers import TrainingArguments

    return "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}


def build_trl_config(section: str, trl_config: str, args: dict[str, Any]):
    """TRL's config dataclass from resolved trainer arguments, as a stage builds it; a bad value raises
    ValueError naming the section (TRL's message names the field)."""
    import trl

    try:
        return getattr(trl, trl_config)(**args)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{section}.trainer: {err}") from None


def lora_config(section, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.target_modules, task_type=task_type)


def needs_ref_copy(args: dict[str, Any], lora: bool) -> bool:
    """Whether DPO needs a second copy of the starting policy as its reference (see dpo_trainer)."""
    return not (lora or args.get("precompute_ref_log_probs"))


def lora_targets(model) -> list[str]:
    """The module names a PEFT model's LoRA adapter resolved to (e.g. `all-linear` on a Llama:
    q/k/v/o_proj, gate/up/down_proj; never lm_head)."""
    config = getattr(model, "peft_config", {}).get("default")
    return sorted(config.target_modules) if config is not None else []
