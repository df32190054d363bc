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
    """flaw_of each answer against its row's reference answer (None for a row checked by its constraints:
    the flaws are a short answer's)."""
    return [None if r.get("constraints") else flaw_of(a["text"], r["completion"][0]["content"] if r.get("completion")
                                                       else None)
            for a, r in zip(answers, rows)]


def flaw_shares(rows: list[dict], kinds: list[str | None]) -> dict[str, float]:
    """Share of answers with each flaw (alignflow.stats.FLAWS; `kinds` from answer_flaws), overall
    (`flaw_<kind>`) and per task type (`flaw_<kind>.<task>`)."""
    shares: dict[str, float] = {}
    for kind in FLAWS:
        shares |= by_task(rows, np.array([k == kind for k in kinds], dtype=float), f"flaw_{kind}")
    return shares


def answered(row: dict, text: str, loose: bool = False) -> bool:
    """Whether an answer is right: it meets every constraint of a row that carries them (IFEval's
    prompt-level accuracy, strict or loose), else it matches the row's reference answer."""
    if row.get("constraints"):
        # imported here: this module is also read on a bare GPU image without pydantic (bench/device_check.py)
        from alignflow.constraints import followed, parse

        return all(followed(parse(row["constraints"]), text, row["prompt"][-1]["content"], loose))
    return is_correct(text, row["completion"][0]["content"] if row.get("completion") else None)


def correctness(rows: list[dict], answers: list[dict]) -> np.ndarray:
    """1.0 where an answer is right (`answered`), per prompt."""
    return np.array([answered(r, a["text"]) for a, r in zip(answers, rows)], dtype=float)


def constraint_metrics(rows: list[dict], answers: list[dict]) -> dict[str, float]:
    """IFEval's other accuracies over the rows that carry constraints: prompt-level loose (`accuracy_loose`,
    overall and per task type), instruction-level strict and loose (`instruction_accuracy`,
    `instruction_accuracy_loose`), and instruction-level strict per constraint type
    (`instruction_accuracy.<instruction id>`, its `:` a `.`: MLflow's metric names have no colon)."""
    from alignflow.constraints import followed, parse

    checked = [(r, a) for r, a in zip(rows, answers) if r.get("constraints")]
    if not checked:
        return {}
    metrics = by_task([r for r, _ in checked], np.array([answered(r, a["text"], loose=True) for r, a in checked],
                                                         dtype=float), "accuracy_loose")
    per_type: dict[str, list[bool]] = {}
    strict_all, loose_all = [], []
    for row, answer in checked:
        constraints, prompt = parse(row["constraints"]), row["prompt"][-1]["content"]
        strict = followed(constraints, answer["text"], prompt)
        strict_all += strict
        loose_all += followed(constraints, answer["text"], prompt, loose=True)
        for c, ok in zip(constraints, strict):
            per_type.setdefault(c.id.replace(":", "."), []).append(ok)
    metrics["instruction_accuracy"] = float(np.mean(strict_all))
    metrics["instruction_accuracy_loose"] = float(np.mean(loose_all))
    return metrics | {f"instruction_accuracy.{t}": float(np.mean(v)) for t, v in sorted(per_type.items())}


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
    hits = np.array([any(answered(r, s["text"]) for s in outs) for r, outs in zip(rows, samples)], dtype=float)
    return by_task(rows, hits, f"pass_at_{k}")


def outcomes_from_scores(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """Per prompt, 1.0 where a model's answer scored above the baseline's, 0.0 below, 0.5 equal."""
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores, baseline_scores)]


def length_controlled_win_rate(outcomes: np.ndarray, length_diff: np.ndarray) -> float:
    """The win rate with the judge's length preference taken out, after AlpacaEval 2's length-controlled
    win rate (Dubois et al. 2024) reduced to its length term: fit logit P(win) = a + b * tanh(d / sd(d))
    on the outcomes (ties as 0.5), d the answer-length difference in words, and read sigmoid(a), the
    win rate between answers of equal length. A judge that favours longer answers shows as a win rate
    above this one. Hand-written (a two-parameter logistic fit by Newton's method, lightly ridged):
    AlpacaEval's own fit lives in the alpaca_eval package, which would bring an OpenAI client stack."""
    spread = length_diff.std()
    x = np.tanh(length_diff / spread) if spread > 0 else np.zeros_like(length_diff, dtype=float)
    design = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-design @ theta))
        grad = design.T @ (outcomes - p) - 1e-3 * theta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-3 * np.eye(2)
        step = np.linalg.solve(hessian, grad)
        theta += step
        if np.abs(step).max() < 1e-8:
            break
    return float(1 / (1 + np.exp(-theta[0])))


def versus(correct: np.ndarray | None, baseline: np.ndarray | None, outcomes: list[float], resamples: int, seed: int,
           length_diff: np.ndarray | None = None, name: str = "sft") -> dict[str, float]:
    """Head to head with a baseline model on the same prompts. `outcomes`: per prompt 1.0 (this model's
    answer judged better), 0.0 (worse) or 0.5 (tie), from a pointwise scorer's scores
    (outcomes_from_scores) or a pairwise judge. Gives wins/losses/ties, the win rate (ties count half)
    with a 95% bootstrap interval over prompts, the length-controlled win rate when the answers' length
    differences are given, and, with reference answers, a paired bootstrap interval on the accuracy
    difference."""
    won = np.asarray(outcomes, dtype=float)
    wins, losses = int((won == 1.0).sum()), int((won == 0.0).sum())
    low, high = bootstrap_ci(won, resamples, seed)
    metrics = {f"wins_vs_{name}": wins, f"losses_vs_{name}": losses, f"ties_vs_{name}": len(won) - wins - losses,
               f"win_rate_vs_{name}": float(won.mean()), f"win_rate_vs_{name}_ci95_low": low,
               f"win_rate_vs_{name}_ci95_high": high}
    if length_diff is not None:
        metrics[f"lc_win_rate_vs_{name}"] = length_controlled_win_rate(won, np.asarray(length_diff, dtype=float))
    if correct is not None and baseline is not None:
        low, high = bootstrap_ci(correct - baseline, resamples, seed)
        metrics |= {f"delta_vs_{name}": float((correct - baseline).mean()),
                    f"delta_vs_{name}_ci95_low": low, f"delta_vs_{name}_ci95_high": high}
    return metrics


def pair_preferences(groups: list[list[float]]) -> list[int]:
    """Every pair (i < j) of one prompt's candidates, prompt by prompt: 1 when candidate i scored
    higher, -1 when j did, 0 for a tie."""
    return [int(np.sign(scores[i] - scores[j])) for scores in groups
            for i in range(len(scores)) for j in range(i + 1, len(scores))]


def agreement(first: list[list[float]], second: list[list[float]]) -> dict[str, float]:
    """How two rankings of the same candidates agree on each pair's order (better, worse, tie): the
    share of pairs ordered alike, and Cohen's kappa (that share corrected for the agreement two
    independent rankers with the same marginals would reach by chance; 1 = perfect, 0 = chance).
    Hand-written: three lines, where scikit-learn's cohen_kappa_score would be a new dependency."""
    a, b = np.array(pair_preferences(first)), np.array(pair_preferences(second))
    if len(a) == 0:
        return {"agreement": float("nan"), "kappa": float("nan"), "pairs": 0}
    observed = float((a == b).mean())
    chance = sum(float((a == c).mean() * (b == c).mean()) for c in (-1, 0, 1))
    kappa = (observed - chance) / (1 - chance) if chance < 1 else float("nan")
    return {"agreement": observed, "kappa": kappa, "pairs": len(a)}
