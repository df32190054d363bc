"""Rankers as online reward functions: any pointwise ranker component (alignflow.rankers: verifier, checker,
reward model, constraints, an ensemble of them) scores a GRPO stage's completions in TRL's reward-function
shape, `f(prompts, completions, **dataset columns) -> list[float]`.

    funcs = reward_functions([{"type": "constraints"}], "cpu")
    GRPOTrainer(..., reward_funcs=funcs)

The training rows carry each prompt's reference (its reference answer or its verifiable constraints) as JSON
text in `reference_json`: one Arrow column of one type whatever the reference is. Built in the training
process itself (the stage's own, or each launched rank), from the components' config dumps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

REFERENCE_COLUMN = "reference_json"


def text_of(completion) -> str:
    """A completion as text: a conversational one by its last message."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def pointwise(scorer, name: str) -> Callable[..., list[float]]:
    """`scorer` (alignflow.components.Scorer) as a TRL reward function named `name` (TRL logs
    `rewards/<name>/mean` and `/std` per step)."""
    def reward(prompts, completions, **columns) -> list[float]:
        references = [json.loads(r) for r in columns[REFERENCE_COLUMN]]
        return [float(x) for x in scorer.score(list(prompts), [text_of(c) for c in completions], references)]

    reward.__name__ = name
    return reward


def check_rewards(rankers: list, where: str) -> None:
    """Before any model loads: every reward scores one answer alone, without a person in the loop."""
    for ranker in rankers:
        if ranker.type == "human":
            raise ValueError(f"{where}: the human ranker labels sampled candidates between stages; it cannot score "
                             "completions while a policy trains (use verifier, checker, constraints, reward_model)")
        if not ranker.pointwise:
            raise ValueError(f"{where}: the {ranker.type} ranker orders a prompt's answers against each other; a "
                             "reward function scores each completion alone (list pointwise rankers as grpo.rewards, "
                             "weighted by grpo.trainer.reward_weights)")


def reward_functions(rankers: list[dict[str, Any] | Callable], device: str, fetch=None
                     ) -> list[Callable[..., list[float]]]:
    """One reward function per ranker config (a component's dump: {"type": ..., its fields}); a callable is taken
    as a reward function as it is (bench/device_check.py, which imports no pydantic, passes its own)."""
    funcs, names = [], set()
    for dump in rankers:
        if callable(dump):
            funcs.append(dump)
            continue
        from alignflow.components import RANKERS

        ranker = RANKERS.validate(dump)
        name = ranker.type if ranker.type not in names else f"{ranker.type}_{len(names)}"
        names.add(name)
        funcs.append(pointwise(ranker.open(device, fetch=fetch), name))
    return funcs
