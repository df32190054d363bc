"""TRL trainers built the way every alignflow stage builds them, and the one table that says, per trainer,
which TRL config class its section's `trainer` keys feed, how it is built and which answers it learns.

    from alignflow.training.trainers import TRAINERS
    trainer = TRAINERS["dpo"].build(model, tokenizer, pairs, args, peft_config, ref_model, callbacks)

A new TRL trainer is one row here (`TRAINERS["orpo"] = Trainer(...)`, from any module) plus its stage module
under tasks/ (docs/extending.md).

Imports neither Prefect nor MLflow (nor pydantic), so bench/device_check.py runs these exact code
paths on a GPU machine that has only torch, transformers, peft, accelerate and TRL's wheels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _dataset(rows: list[dict], keys: tuple[str, ...]):
    from datasets import Dataset

    return Dataset.from_list([{k: r[k] for k in keys} for r in rows])


def sft_trainer(model, tokenizer, rows: list[dict], args: dict[str, Any], peft_config=None, ref_model=None,
                callbacks=()):
    """TRL's SFTTrainer on conversational prompt/completion rows: the loss falls on the completion only."""
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=_dataset(rows, ("prompt", "completion")),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))


def rft_trainer(model, tokenizer, pairs: list[dict], args: dict[str, Any], peft_config=None, ref_model=None,
                callbacks=()):
    """Rejection-sampling fine-tuning: SFT on the chosen answers of preference pairs."""
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    return sft_trainer(model, tokenizer, rows, args, peft_config, callbacks=callbacks)


def dpo_trainer(model, tokenizer, pairs: list[dict], args: dict[str, Any], peft_config=None, ref_model=None,
                callbacks=()):
    """TRL's DPOTrainer on conversational preference pairs. The reference is the starting policy: with
    LoRA, the policy with its adapter disabled; with precomputed reference log-probs, scored once by
    the policy before training; otherwise pass `ref_model`, a second copy (TRL would reload it from the
    policy's `name_or_path`, which for a merged adapter is the base, not the policy)."""
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**args),
                      train_dataset=_dataset(pairs, ("prompt", "chosen", "rejected")), processing_class=tokenizer,
                      peft_config=peft_config, callbacks=list(callbacks))


def grpo_trainer(model, tokenizer, rows: list[dict], args: dict[str, Any], peft_config=None, ref_model=None,
                 callbacks=(), rewards=(), device: str = "cpu"):
    """TRL's GRPOTrainer on conversational prompts: it samples `num_generations` completions per prompt from the
    policy as it trains and scores them with `rewards` (ranker configs; alignflow.training.rewards), weighted
    by `reward_weights`. The reference for its KL term (`beta` > 0) is the starting policy, as in DPO."""
    from trl import GRPOConfig, GRPOTrainer

    from alignflow.training.rewards import REFERENCE_COLUMN, reward_functions

    return GRPOTrainer(model=model, reward_funcs=reward_functions(list(rewards), device), args=GRPOConfig(**args),
                       train_dataset=_dataset(rows, ("prompt", REFERENCE_COLUMN)), processing_class=tokenizer,
                       peft_config=peft_config, callbacks=list(callbacks))


@dataclass(frozen=True)
class Trainer:
    """One TRL trainer as alignflow runs it."""

    config: str  # the TRL config class (`trl.<config>`) that a stage's `trainer` keys feed
    # build(model, tokenizer, rows, args, peft_config, ref_model, callbacks, **options) -> a TRL trainer; `ref_model`
    # is a second copy of the policy when the stage asks for one (TrainJob.ref_copy), else None; `options` are the
    # stage's TrainJob.options (GRPO's rewards)
    build: Callable[..., Any]
    # the row keys holding what it learns (fitted to max_length with the prompt); none for an online trainer (GRPO),
    # which learns from what it samples
    answers: tuple[str, ...]
    preference: bool = False  # trained on preference pairs: the preference watch reads its run (tasks.watch_preference)


TRAINERS: dict[str, Trainer] = {
    "sft": Trainer("SFTConfig", sft_trainer, ("completion",)),
    "rft": Trainer("SFTConfig", rft_trainer, ("chosen",), preference=True),
    "dpo": Trainer("DPOConfig", dpo_trainer, ("chosen", "rejected"), preference=True),
    "grpo": Trainer("GRPOConfig", grpo_trainer, ()),  # online: it learns from the completions it samples
}


def fit_to_length(rows: list[dict], tokenizer, trainer: str, max_length: int | None, truncation_mode: str,
                  overlength: str) -> tuple[list[dict], dict[str, Any]]:
    """Rows measured in tokens as the trainer will see them (the chat template applied to prompt + answer);
    those over `max_length` are counted, and truncated by TRL (`overlength: truncate`) or dropped here
    (`drop`). A row whose prompt alone fills `max_length` would keep no answer token under TRL's
    `keep_start` truncation: it teaches nothing (a batch of only such rows has a loss over no token, 0/0),
    so it is dropped in either mode.
    Returns (rows to train on, report: rows, overlength, dropped, max_tokens, first row numbers over)."""

    def length(messages: list[dict], generation_prompt: bool = False) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                                 return_dict=True)["input_ids"])

    kept, over, dropped, longest = [], [], 0, 0
    for i, row in enumerate(rows, start=1):
        # a key missing: TRL says so
        tokens = max(length(row["prompt"] + row.get(key, [])) for key in TRAINERS[trainer].answers)
        longest = max(longest, tokens)
        if max_length is None or tokens <= max_length:
            kept.append(row)
            continue
        over.append(i)
        no_answer = truncation_mode == "keep_start" and length(row["prompt"], True) >= max_length
        if overlength == "drop" or no_answer:
            dropped += 1
        else:
            kept.append(row)
    return kept, {"rows": len(rows), "overlength": len(over), "dropped": dropped, "max_tokens": longest,
                  "examples": over[:5]}
