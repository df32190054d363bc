"""Preference pairs from scored candidates: the pair strategies that ship with alignflow (registered
components, alignflow.components.PAIRS) and `build_pairs`, which applies one."""

from __future__ import annotations

import random

from alignflow.components import PAIRS, PairStrategy


@PAIRS.register("best_worst")
class BestWorst(PairStrategy):
    """The highest- against the lowest-scored candidate (the widest margin)."""

    type: str = "best_worst"

    def pick(self, scores, min_margin, rng):
        return max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)


@PAIRS.register("best_random")
class BestRandom(PairStrategy):
    """The highest against a random candidate scored clearly below it (more varied rejections, as in
    Online-RLHF's ablations)."""

    type: str = "best_random"

    def pick(self, scores, min_margin, rng):
        best = max(range(len(scores)), key=scores.__getitem__)
        lower = [i for i in range(len(scores)) if scores[best] - scores[i] > min_margin]
        return best, rng.choice(lower) if lower else best


def build_pairs(rows: list[dict], rewards: list[list[float]], min_margin: float = 0.0,
                strategy: PairStrategy | str = "best_worst", seed: int = 0) -> tuple[list[dict], int]:
    """One preference pair per prompt, in TRL's conversational preference format. A prompt whose pair
    differs by no more than `min_margin` is a tie and is dropped (DPO learns nothing from two equally
    good answers). Returns (pairs, ties)."""
    strategy = PAIRS.validate(strategy)
    rng = random.Random(seed)
    pairs, ties = [], 0
    for row, scores in zip(rows, rewards):
        best, worst = strategy.pick(scores, min_margin, rng)
        margin = scores[best] - scores[worst]
        if margin <= min_margin:
            ties += 1
            continue
        pairs.append({
            "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": row["candidates"][best]}],
            "rejected": [{"role": "assistant", "content": row["candidates"][worst]}],
            "margin": margin, "chosen_reward": scores[best], "rejected_reward": scores[worst],
            "task": row["task"],
        })
    return pairs, ties
