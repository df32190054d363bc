"""Evaluation statistics, shared by the stages that judge models (evaluate, promote): exact-match
correctness, what is wrong with a wrong answer, bootstrap intervals, pass@k, and the head-to-head
against a baseline."""

from __future__ import annotations

import numpy as np


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_correct(response: str, reference: str | None) -> bool:
    return reference is not None and normalize(response) == normalize(reference)


FLAWS = ("wrong", "verbose", "runon")  # what can be wrong with a short answer, in the report's order


def flaw_of(response: str, reference: str | None) -> str | None:
    """What is wrong with an answer to a short-answer question, or None when it is the reference:
    `runon` (the right answer said again and again, never ending the turn: the cut-off tail of a
    generation that hit max_new_tokens counts), `verbose` (the right answer, then words that are not
    it: rambling past the answer) or `wrong` (anything else: a wrong value, an empty answer)."""
    if reference is None:
        return "wrong"
    resp, ref = normalize(response), normalize(reference)
    if resp == ref:
        return None
    rest = resp[len(ref):]
    if not ref or not resp.startswith(ref) or rest[0].isalnum():  # "12" is not "1" said at length
        return "wrong"
    words, ref_words = rest.split(), ref.split()
    if rest[0] == " " and all(w in ref_words or (i == len(words) - 1 and any(r.startswith(w) for r in ref_words))
                              for i, w in enumerate(words)):
        return "runon"
    return "verbose"


def answer_flaws(rows: list[dict], answers: list[dict]) -> list[str | None]:
    """flaw_of each answer against its row's reference answer."""
    return [flaw_of(a["text"], r["completion"][0]["content"] if r.get("completion") else None)
            for a, r in zip(answers, rows)]


def flaw_shares(rows: list[dict], kinds: list[str | None]) -> dict[str, float]:
    """Share of answers with each flaw (alignflow.stats.FLAWS; `kinds` from answer_flaws), overall
    (`flaw_<kind>`) and per task type (`flaw_<kind>.<task>`)."""
    shares: dict[str, float] = {}
    for kind in FLAWS:
        shares |= by_task(rows, np.array([k == kind for k in kinds], dtype=float), f"flaw_{kind}")
    return shares


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
