"""Baseline stage `grpo`: online RL on the ranker's rewards, beside DPO on the same SFT model and prompts.

TRL's GRPOTrainer samples `trainer.num_generations` completions per sampling prompt from the policy as it trains,
scores each with the reward rankers (alignflow.training.rewards: any pointwise ranker; by default the rank stage's,
the reward the DPO pairs were ranked by) and moves the policy towards the completions that beat their group's mean.
Where DPO learns offline from one ranked pair per prompt, GRPO keeps sampling from the policy it is training: the
comparison `dpo` / `grpo` / `rft` in one run is the question "pairs or online reward?" on the same data.

    dpo: {baselines: [rft, grpo]}
    grpo:
      rewards: [constraints]           # default: rank.ranker
      trainer: {num_generations: 4, max_completion_length: 96, learning_rate: 5.0e-5, loss_type: dapo}

The model is saved as DPO's is (a LoRA adapter merged into the policy it started from), evaluated as `grpo`.
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import GRPOSection, RankSection
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext
from tasks import check_training, train_stage, trainer_arguments
from tasks.caching import stage_dir
from tasks.stages import Stage, register


def check(config, device: str, out_dir) -> None:
    from alignflow.training.rewards import check_rewards

    rewards = config.grpo_rewards()
    check_rewards(rewards, "grpo.rewards" if config.grpo.rewards else "grpo (rewarded by rank.ranker)")
    weights = config.grpo.trainer.get("reward_weights")
    if weights is not None and len(weights) != len(rewards):
        raise ValueError(f"grpo.trainer.reward_weights has {len(weights)} weight(s) for {len(rewards)} reward(s)")
    loss_type, known = config.grpo.trainer.get("loss_type"), trl_loss_types()
    if loss_type is not None and known and loss_type not in known:  # TRL itself refuses it mid-training
        raise ValueError(f"grpo.trainer.loss_type {loss_type!r} is not one of TRL's: {', '.join(known)}")
    args = trainer_arguments(config.grpo, "grpo", device, config.seed, out_dir)
    check_training("grpo", "grpo", args, "grpo", config.grpo.launch, device)


def trl_loss_types() -> list[str]:
    """The loss types the installed TRL's GRPOConfig names as supported (its field is a plain string, checked
    only when the first loss is computed), read from the field's own help text so that they follow TRL."""
    import dataclasses
    import re

    from trl import GRPOConfig

    text = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type").metadata.get("help", "")
    listed = re.search(r"Supported values are (.*?)\.", text)
    return re.findall(r"'(\w+)'", listed.group(1)) if listed else []


def prompt_inputs(policy: ModelRef, prompts: DatasetRef, name: str, out_dir) -> tuple[str, str, object]:
    """Read and log the prompts, write them as GRPO's rows (the prompt, and what a reward checks an answer
    against as JSON text), load the policy's tokenizer and check its chat template.
    Returns (rows path, local policy path, tokenizer)."""
    from alignflow.data.instructions import reference_of
    from alignflow.data.records import read_jsonl, write_jsonl
    from alignflow.models.loading import load_tokenizer
    from alignflow.models.templates import check_template
    from alignflow.tracking import log_dataset
    from alignflow.training.rewards import REFERENCE_COLUMN

    rows = read_jsonl(prompts.resolve())
    log_dataset(rows, source=prompts.uri, name="prompts", context="training")
    path = write_jsonl([{"prompt": r["prompt"], REFERENCE_COLUMN: json.dumps(reference_of(r))} for r in rows],
                       out_dir / "prompts.jsonl")
    policy_path = policy.resolve()
    tokenizer = load_tokenizer(policy_path, policy.trust_remote_code)
    check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
    return str(path), policy_path, tokenizer


@task(name="grpo", cache_policy=NONE)
def grpo(cfg: GRPOSection, rank: RankSection, policy: ModelRef, prompts: DatasetRef, ctx: RunContext,
         name: str = "grpo", cache_key: str | None = None) -> ModelRef:
    out_dir = stage_dir(ctx, name, cache_key)
    args = trainer_arguments(cfg, "grpo", ctx.device, ctx.seed, out_dir / "trainer")
    rewards = [r.model_dump(mode="json") for r in cfg.reward_rankers(rank)]
    return train_stage(ctx, name, "grpo", cfg, "grpo", args, policy, out_dir, cache_key,
                       inputs=lambda: prompt_inputs(policy, prompts, name, out_dir),
                       params={"policy": policy.uri, "rewards": [r["type"] for r in rewards]}, merge_adapter=True,
                       options={"rewards": rewards, "device": ctx.device})


register(Stage(name="grpo", task=grpo, config={"cfg": "grpo", "rank": "rank"},
               inputs={"policy": "sft", "prompts": "load_data.prompts"}, evaluated_as="grpo", trains=True,
               baseline_of="dpo", after=("dpo",), enabled=lambda config: config.grpo_runs(), check=check,
               describe="baseline: online RL on the ranker's rewards (TRL GRPOTrainer)"))
