"""Stage 6: every model on the same held-out prompts with the same decoding.

Per model: greedy accuracy overall and per task type with a 95% bootstrap interval over prompts,
mean reward, response length, EOS rate, pass@k (k sampled answers, any correct) overall and per task
type, and against the SFT model the verifier-judged win rate and a paired bootstrap interval on the
accuracy difference. Metric names are stable (`<model>.accuracy`, `<model>.accuracy.<task>`,
`<model>.pass_at_8`, `<model>.win_rate_vs_sft`, ...) and go on both the evaluate run and the parent
run, so runs compare column for column in the MLflow UI.
"""

from __future__ import annotations

import numpy as np
import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import EvalSection, RankSection
from alignflow.data import read_jsonl
from alignflow.modeling import check_template, generate, load_causal_lm, load_tokenizer, template_fingerprint
from alignflow.rankers import Verifier, is_correct, make_ranker
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, eval_metrics, flatten, log_dataset, log_metrics, stage_run
from tasks import stage_logger


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of `values`, resampling prompts with replacement."""
    if resamples == 0 or len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score_answers(rows: list[dict], answers: list[dict], ranker
                  ) -> tuple[dict[str, float], np.ndarray, list[float]]:
    """Greedy-answer metrics, and the per-prompt correctness and rewards they come from."""
    references = [r["completion"][0]["content"] for r in rows]
    correct = np.array([is_correct(a["text"], ref) for a, ref in zip(answers, references)], dtype=float)
    rewards = ranker.score([r["prompt"] for r in rows], [a["text"] for a in answers], references)
    metrics = {"accuracy": correct.mean(), "mean_reward": sum(rewards) / len(rows),
               "eos_rate": sum(a["ended"] for a in answers) / len(rows),
               "mean_words": sum(len(a["text"].split()) for a in answers) / len(rows)}
    for task_name in sorted({r["task"] for r in rows}):
        metrics[f"accuracy.{task_name}"] = correct[[r["task"] == task_name for r in rows]].mean()
    return {k: float(v) for k, v in metrics.items()}, correct, rewards


def greedy_answers(path: str, prompts: list, cfg: EvalSection, device: str, label: str,
                   chat_template: str | None = None):
    """(model, tokenizer, answers): one greedy answer per prompt, with the eval section's settings,
    rendered with the chat template the model was recorded with (checked before the weights load)."""
    tokenizer = load_tokenizer(path)
    check_template(tokenizer, chat_template, f"evaluate {label}", f"model {label}")
    model = load_causal_lm(path, device)
    answers = [a[0] for a in generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, progress=f"eval {label}")]
    return model, tokenizer, answers


def pass_at_k(rows: list[dict], samples: list[list[dict]], k: int) -> dict[str, float]:
    """Share of prompts where any of k sampled answers is correct, overall and per task type."""
    hits = np.array([any(is_correct(s["text"], r["completion"][0]["content"]) for s in outs)
                     for r, outs in zip(rows, samples)], dtype=float)
    metrics = {f"pass_at_{k}": hits.mean()}
    for task_name in sorted({r["task"] for r in rows}):
        metrics[f"pass_at_{k}.{task_name}"] = hits[[r["task"] == task_name for r in rows]].mean()
    return {key: float(v) for key, v in metrics.items()}


def report_prompts(rows: list[dict], n: int) -> list[int]:
    """Indices of n eval prompts for side-by-side answers: one per task type first, then in order."""
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r["task"], i)
    chosen = list(first.values())[:n]
    return chosen + [i for i in range(len(rows)) if i not in chosen][: n - len(chosen)]


@task(name="evaluate", cache_policy=NONE)
def evaluate(cfg: EvalSection, models: dict[str, ModelRef], data: DatasetRef, ctx: RunContext,
             rank_cfg: RankSection | None = None, cache_key: str | None = None) -> dict:
    logger = stage_logger()
    params = flatten({**cfg.model_dump(exclude={"data"}), **{f"model.{k}": m.uri for k, m in models.items()}},
                     "eval")
    with stage_run(ctx, "evaluate", params, cache_key) as run_id:
        rows = read_jsonl(data.resolve())
        log_dataset(rows, source=data.uri, name="eval", context="evaluation")
        ranker = make_ranker(rank_cfg, ctx.device) if rank_cfg else Verifier()
        verifier = Verifier()
        shown = report_prompts(rows, cfg.report_prompts)
        results: dict = {"eval_run_id": run_id, "metrics": {}, "examples": [{"prompt": rows[i]["prompt"][-1]["content"], "task": rows[i]["task"],
                                                      "reference": rows[i]["completion"][0]["content"], "answers": {}}
                                                     for i in shown]}
        samples = {"model": [], "prompt": [], "reference": [], "answer": [], "correct": []}
        correct: dict[str, np.ndarray] = {}
        rewards: dict[str, list[float]] = {}
        prompts = [r["prompt"] for r in rows]
        references = [r["completion"][0]["content"] for r in rows]
        for name, ref in models.items():
            model, tokenizer, answers = greedy_answers(ref.resolve(), prompts, cfg, ctx.device, name, ref.chat_template)
            mlflow.set_tag(f"alignflow.chat_template.{name}", template_fingerprint(tokenizer))
            metrics, correct[name], ranked = score_answers(rows, answers, ranker)
            low, high = bootstrap_ci(correct[name], cfg.bootstrap, ctx.seed)
            metrics |= {"accuracy_ci95_low": low, "accuracy_ci95_high": high}
            # the win rate is judged by the verifier whatever ranked the pairs, unless the config says ranker
            rewards[name] = ranked if isinstance(ranker, Verifier) or cfg.win_rate_by == "ranker" else \
                verifier.score(prompts, [a["text"] for a in answers], references)
            if cfg.pass_k:
                sampled = generate(model, tokenizer, prompts, num_return_sequences=cfg.pass_k, do_sample=True,
                                   temperature=cfg.pass_temperature, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=max(1, cfg.batch_size // cfg.pass_k), seed=ctx.seed,
                                   progress=f"pass@{cfg.pass_k} {name}")
                metrics |= pass_at_k(rows, sampled, cfg.pass_k)
            results["metrics"][name] = metrics
            for example, i in zip(results["examples"], shown):
                example["answers"][name] = answers[i]["text"]
            logger.info("%s: accuracy %.3f [%.3f, %.3f], mean reward %.3f", name, metrics["accuracy"], low, high,
                        metrics["mean_reward"])
            for row, answer, hit in list(zip(rows, answers, correct[name]))[: cfg.samples_logged]:
                samples["model"].append(name)
                samples["prompt"].append(row["prompt"][-1]["content"])
                samples["reference"].append(row["completion"][0]["content"])
                samples["answer"].append(answer["text"])
                samples["correct"].append(bool(hit))
        if "sft" in models:
            for name in models:
                if name in ("sft", "base"):
                    continue
                results["metrics"][name] |= versus(correct[name], correct["sft"], rewards[name], rewards["sft"],
                                                   cfg.bootstrap, ctx.seed)
        results["correct"] = {name: c.tolist() for name, c in correct.items()}  # per prompt, for promotion
        flat = eval_metrics(results)
        log_metrics(run_id, flat)
        log_metrics(ctx.parent_run_id, flat)  # the parent run carries the comparison columns
        mlflow.log_table(samples, "eval_samples.json")
        mlflow.log_dict(results, "eval_results.json")
        return results


def versus(correct: np.ndarray, baseline: np.ndarray, rewards: list[float], baseline_rewards: list[float],
           resamples: int, seed: int) -> dict[str, float]:
    """Head to head with the SFT model on the same prompts: verifier-judged wins/losses/ties, win
    rate (wins over decided prompts; ties count half), and a paired bootstrap interval on the
    accuracy difference."""
    wins = sum(a > b for a, b in zip(rewards, baseline_rewards))
    losses = sum(a < b for a, b in zip(rewards, baseline_rewards))
    ties = len(rewards) - wins - losses
    low, high = bootstrap_ci(correct - baseline, resamples, seed)
    return {"wins_vs_sft": wins, "losses_vs_sft": losses, "ties_vs_sft": ties,
            "win_rate_vs_sft": (wins + 0.5 * ties) / len(rewards),
            "delta_vs_sft": float((correct - baseline).mean()),
            "delta_vs_sft_ci95_low": low, "delta_vs_sft_ci95_high": high}
