"""Stage 6: every model on the same held-out prompts with the same decoding.

Per model: greedy accuracy overall and per task type with a 95% bootstrap interval over prompts,
mean reward (by the rank stage's ranker when it scores one answer alone, named in the `eval.reward_by`
param), response length (words, tokens), EOS rate, repetition rate (alignflow.health: what degenerate
preference tuning shows first; for each preference-trained model also against its SFT model), the
share of answers with each flaw (wrong value, verbose, run-on:
alignflow.stats.flaw_of) overall and per task type, pass@k (k sampled answers, any correct) overall and
per task type, and against the SFT model the win rate with its bootstrap interval and the
length-controlled win rate (judged by `eval.win_rate_by`: the verifier, or the ranker, pointwise by
scores or pairwise by a judge) and a paired bootstrap interval on the accuracy difference. Eval
prompts without reference answers (allowed when a ranker that needs none judges) get the head-to-head
only. The report's side-by-side prompts are drawn at random (seeded), plus
one drawn among those where SFT and DPO answer differently. Metric names are stable
(`<model>.accuracy`, `<model>.accuracy.<task>`, `<model>.flaw_verbose`, `<model>.pass_at_8`,
`<model>.win_rate_vs_sft`, ...) and go on both the evaluate run and the parent
run, so runs compare column for column in the MLflow UI. Statistics: alignflow.stats; answers: the
configured generation engine (alignflow.engines).
"""

from __future__ import annotations

import random

import mlflow
import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import EvalSection, RankSection
from alignflow.data.instructions import reference_of
from alignflow.data.records import read_jsonl
from alignflow.health import answer_health, versus_sft
from alignflow.rankers.constraints import Constraints
from alignflow.rankers.verifier import Verifier
from alignflow.refs import DatasetRef, ModelRef
from alignflow.stats import (answer_flaws, bootstrap_ci, by_task, constraint_metrics, correctness, flaw_shares,
                             outcomes_from_scores, pass_at_k, versus)
from alignflow.tracking import EvalResults, RunContext, eval_metrics, flatten, log_dataset, log_metrics, stage_run
from tasks import stage_logger
from tasks.answers import answer
from tasks.stages import MODELS, Stage, register
from tasks.transfer import local_model


def report_prompts(rows: list[dict], n: int, seed: int) -> list[int]:
    """Indices of n eval prompts for side-by-side answers, drawn at random (seeded): a sample of
    what the models do, not a chosen showcase."""
    return sorted(random.Random(f"report-{seed}").sample(range(len(rows)), min(n, len(rows))))


def differing_prompt(answers: dict[str, list[dict]], shown: list[int], seed: int,
                     models: tuple[str, str] = ("sft", "dpo")) -> int | None:
    """One eval prompt, drawn at random (seeded) among those not shown yet, where the two models'
    answers differ: where the preference stage changed something, whichever way."""
    if not all(m in answers for m in models):
        return None
    first, second = (answers[m] for m in models)
    differ = [i for i, (a, b) in enumerate(zip(first, second)) if a["text"] != b["text"] and i not in shown]
    return random.Random(f"differ-{seed}").choice(differ) if differ else None


def task_deltas(rows: list[dict], diff: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    """Per task type (more than one), the accuracy difference against SFT with its paired 95% bootstrap
    interval: `delta_vs_sft.<task>`, `delta_vs_sft_ci95_low.<task>`, `delta_vs_sft_ci95_high.<task>`."""
    names = sorted({r["task"] for r in rows})
    metrics = {}
    for t in names if len(names) > 1 else []:
        part = diff[[r["task"] == t for r in rows]]
        low, high = bootstrap_ci(part, resamples, seed)
        metrics |= {f"delta_vs_sft.{t}": float(part.mean()), f"delta_vs_sft_ci95_low.{t}": low,
                    f"delta_vs_sft_ci95_high.{t}": high}
    return metrics


def _shown(reference: str | list[dict] | None) -> str:
    """A reference as the report and the samples table show it: the answer, or the constraints' ids."""
    if isinstance(reference, list):
        return "constraints: " + ", ".join(c["id"] for c in reference)
    return reference or ""


def _example(row: dict, answers: dict[str, list[dict]], i: int, label: str) -> dict:
    reference = _shown(reference_of(row))
    return {"prompt": row["prompt"][-1]["content"], "task": row["task"], "reference": reference,
            "answers": {name: given[i]["text"] for name, given in answers.items()}, "label": label}


@task(name="evaluate", cache_policy=NONE)
def evaluate(cfg: EvalSection, models: dict[str, ModelRef], data: DatasetRef, ctx: RunContext,
             rank_cfg: RankSection | None = None, cache_key: str | None = None) -> EvalResults:
    logger = stage_logger()
    rows = read_jsonl(data.resolve())
    checks = any(r.get("constraints") for r in rows)  # prompts with verifiable constraints (IFEval's ids)
    default = Constraints() if checks else Verifier()
    ranker = rank_cfg.ranker if rank_cfg else default
    if checks and ranker.needs_reference:  # a reference-answer ranker cannot score constraint prompts
        logger.info("the eval prompts carry constraints: rewards by the constraints ranker, not the %s", ranker.type)
        ranker = default
    params = flatten({**cfg.model_dump(mode="json", exclude={"data"}), "reward_by": ranker.type,
                      **{f"model.{k}": m.uri for k, m in models.items()}}, "eval")
    with stage_run(ctx, "evaluate", params, cache_key) as run_id:
        log_dataset(rows, source=data.uri, name="eval", context="evaluation")
        # the ranker gives each answer its mean reward (when it scores one answer alone) and, with
        # eval.win_rate_by: ranker, judges the head-to-head against SFT; else the verifier judges it
        by_ranker = isinstance(ranker, type(default)) or cfg.win_rate_by == "ranker"
        scorer = ranker.open(ctx.device, fetch=local_model) if ranker.pointwise or by_ranker else None
        judge = scorer if by_ranker else default
        judged: dict[str, list[float]] = {}  # a pointwise judge's scores, per model
        results: EvalResults = {"eval_run_id": run_id, "metrics": {}, "examples": []}
        samples = {"model": [], "prompt": [], "reference": [], "answer": [], "correct": [], "flaw": []}
        correct: dict[str, np.ndarray] = {}
        given: dict[str, list[dict]] = {}
        prompts = [r["prompt"] for r in rows]
        # without reference answers (open-ended prompts) the ranker's head-to-head is the evaluation
        references = [reference_of(r) for r in rows]
        refs = all(ref is not None for ref in references)
        if not refs:
            logger.info("the eval prompts have no reference answers: no accuracy, flaws or pass@k; the %s judges "
                        "each model against SFT", ranker.type)
        for name, ref in models.items():
            template, answers, sampled = answer(cfg, ref, prompts, ctx.device, name, ctx.seed,
                                                cfg.pass_k if refs else 0)
            mlflow.set_tag(f"alignflow.chat_template.{name}", template)
            texts = [a["text"] for a in answers]
            given[name] = answers
            metrics = {"eos_rate": sum(a["ended"] for a in answers) / len(rows),
                       "mean_words": sum(len(t.split()) for t in texts) / len(rows), **answer_health(answers)}
            if scorer is not None and scorer.pointwise:  # a pairwise judge gives no reward to one answer alone
                rewards = scorer.score(prompts, texts, references)
                metrics["mean_reward"] = sum(rewards) / len(rows)
            if judge.pointwise:
                judged[name] = rewards if judge is scorer else judge.score(prompts, texts, references)
            flaws = [None] * len(rows)
            if refs:
                correct[name], flaws = correctness(rows, answers), answer_flaws(rows, answers)
                low, high = bootstrap_ci(correct[name], cfg.bootstrap, ctx.seed)
                metrics |= by_task(rows, correct[name], "accuracy") | {
                    "accuracy_ci95_low": low, "accuracy_ci95_high": high}
                metrics |= constraint_metrics(rows, answers) if checks else flaw_shares(rows, flaws)
                if sampled is not None:
                    metrics |= pass_at_k(rows, sampled, cfg.pass_k)
            results["metrics"][name] = metrics
            logger.info("%s: accuracy %.3f [%.3f, %.3f], mean reward %.3f, EOS rate %.3f, %.1f tokens, repetition "
                        "rate %.3f", name, metrics.get("accuracy", float("nan")),
                        metrics.get("accuracy_ci95_low", float("nan")), metrics.get("accuracy_ci95_high", float("nan")),
                        metrics.get("mean_reward", float("nan")), metrics["eos_rate"], metrics["mean_tokens"],
                        metrics["repetition_rate"])
            for i, (row, a, flaw) in enumerate(list(zip(rows, answers, flaws))[: cfg.samples_logged]):
                samples["model"].append(name)
                samples["prompt"].append(row["prompt"][-1]["content"])
                samples["reference"].append(_shown(references[i]))
                samples["answer"].append(a["text"])
                samples["correct"].append(bool(correct[name][i]) if refs else None)
                samples["flaw"].append(flaw or "")
        if "sft" in models:
            sft_texts = [a["text"] for a in given["sft"]]
            for name in models:
                if name not in ("sft", "base"):
                    texts = [a["text"] for a in given[name]]
                    lengths = np.array([len(a.split()) - len(b.split()) for a, b in zip(texts, sft_texts)])
                    outcomes = outcomes_from_scores(judged[name], judged["sft"]) if judge.pointwise else \
                        judge.compare(prompts, texts, sft_texts, references)
                    results["metrics"][name] |= versus(correct.get(name), correct.get("sft"), outcomes,
                                                       cfg.bootstrap, ctx.seed, length_diff=lengths)
                    if refs:
                        results["metrics"][name] |= task_deltas(rows, correct[name] - correct["sft"], cfg.bootstrap,
                                                                ctx.seed)
                    results["metrics"][name] |= versus_sft(results["metrics"][name], results["metrics"]["sft"])
        if scorer is not None:
            log_metrics(run_id, scorer.stats())
            scorer.close()
        shown = report_prompts(rows, cfg.report_prompts, ctx.seed)
        results["examples"] = [_example(rows[i], given, i, "random") for i in shown]
        differ = differing_prompt(given, shown, ctx.seed) if cfg.report_prompts else None
        if differ is not None:
            results["examples"].append(_example(rows[differ], given, differ, "SFT and DPO differ"))
        results["correct"] = {name: c.tolist() for name, c in correct.items()}  # per prompt, for promotion
        results["tasks"] = [r["task"] for r in rows]  # per prompt, for pooling seeds (bench/quality.py)
        flat = eval_metrics(results)
        log_metrics(run_id, flat)
        log_metrics(ctx.parent_run_id, flat)  # the parent run carries the comparison columns
        mlflow.log_table(samples, "eval_samples.json")
        mlflow.log_dict(results, "eval_results.json")
        return results


register(Stage(name="evaluate", task=evaluate, config={"cfg": "eval", "rank_cfg": "rank"},
               inputs={"models": MODELS, "data": "load_data.eval"},
               results_artifact="eval_results.json", describe="every model on the same held-out prompts"))
