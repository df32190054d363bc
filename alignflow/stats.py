"""Evaluation statistics, shared by the stages that judge models (evaluate, promote): exact-match
correctness, bootstrap intervals, pass@k, and the head-to-head against a baseline."""

from __future__ import annotations

import numpy as np


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_correct(response: str, reference: str | None) -> bool:
    return reference is not None and normalize(response) == normalize(reference)


def correctness(rows: list[dict], answers: list[dict]) -> np.ndarray:
    """1.0 where an answer matches its row's reference answer, per prompt."""
    return np.array([is_correct(a["text"], r["completion"][0]["content"]) for a, r in zip(answers, rows)],
                    dtype=float)


def by_task(rows: list[dict], values: np.ndarray, name: str) -> dict[str, float]:
    """The mean of per-prompt values overall (`name`) and per task type (`name.<task>`)."""
    metrics = {name: float(values.mean())}
    for task_name in sorted({r["task"] for r in rows}):
        metrics[f"{name}.{task_name}"] = float(values[[r["task"] == task_name for r in rows]].mean())
    return metrics


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of `values`, resampling prompts with replacement."""
    if resamples == 0 or len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def pass_at_k(rows: list[dict], samples: list[list[dict]], k: int) -> dict[str, float]:
    """Share of prompts where any of k sampled answers is correct, overall and per task type."""
    hits = np.array([any(is_correct(s["text"], r["completion"][0]["content"]) for s in outs)
                     for r, outs in zip(rows, samples)], dtype=float)
    return by_task(rows, hits, f"pass_at_{k}")


def versus(correct: np.ndarray, baseline: np.ndarray, rewards: list[float], baseline_rewards: list[float],
           resamples: int, seed: int, name: str = "sft") -> dict[str, float]:
    """Head to head with a baseline model on the same prompts: wins/losses/ties by reward, win rate
    (wins over all prompts; ties count half), and a paired bootstrap interval on the accuracy difference."""
    wins = sum(a > b for a, b in zip(rewards, baseline_rewards))
    losses = sum(a < b for a, b in zip(rewards, baseline_rewards))
    ties = len(rewards) - wins - losses
    low, high = bootstrap_ci(correct - baseline, resamples, seed)
    return {f"wins_vs_{name}": wins, f"losses_vs_{name}": losses, f"ties_vs_{name}": ties,
            f"win_rate_vs_{name}": (wins + 0.5 * ties) / len(rewards),
            f"delta_vs_{name}": float((correct - baseline).mean()),
            f"delta_vs_{name}_ci95_low": low, f"delta_vs_{name}_ci95_high": high}
