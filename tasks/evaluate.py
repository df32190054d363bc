"""Stage 6: every model on the same held-out prompts with the same decoding.

Per model: greedy accuracy overall and per task type with a 95% bootstrap interval over prompts,
mean reward (by the rank stage's ranker, named in the `eval.reward_by` param), response length, EOS
rate, pass@k (k sampled answers, any correct) overall and per task type, and against the SFT model
the win rate (judged by `eval.win_rate_by`) and a paired bootstrap interval on the accuracy
difference. Metric names are stable (`<model>.accuracy`, `<model>.accuracy.<task>`,
`<model>.pass_at_8`, `<model>.win_rate_vs_sft`, ...) and go on both the evaluate run and the parent
run, so runs compare column for column in the MLflow UI. Statistics: alignflow.stats; answers: the
configured generation engine (alignflow.generation).
"""

from __future__ import annotations

import mlflow
import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import EvalSection, RankSection
from alignflow.data import read_jsonl
from alignflow.generation import answer
from alignflow.rankers import Verifier
from alignflow.refs import DatasetRef, ModelRef
from alignflow.stages import MODELS, Stage, register
from alignflow.stats import bootstrap_ci, by_task, correctness, pass_at_k, versus
from alignflow.tracking import EvalResults, RunContext, eval_metrics, flatten, log_dataset, log_metrics, stage_run
from tasks import stage_logger
from tasks.transfer import local_model


def report_prompts(rows: list[dict], n: int) -> list[int]:
    """Indices of n eval prompts for side-by-side answers: one per task type first, then in order."""
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r["task"], i)
    chosen = list(first.values())[:n]
    return chosen + [i for i in range(len(rows)) if i not in chosen][: n - len(chosen)]


@task(name="evaluate", cache_policy=NONE)
def evaluate(cfg: EvalSection, models: dict[str, ModelRef], data: DatasetRef, ctx: RunContext,
             rank_cfg: RankSection | None = None, cache_key: str | None = None) -> EvalResults:
    logger = stage_logger()
    ranker = rank_cfg.ranker if rank_cfg else Verifier()
    params = flatten({**cfg.model_dump(mode="json", exclude={"data"}), "reward_by": ranker.type,
                      **{f"model.{k}": m.uri for k, m in models.items()}}, "eval")
    with stage_run(ctx, "evaluate", params, cache_key) as run_id:
        rows = read_jsonl(data.resolve())
        log_dataset(rows, source=data.uri, name="eval", context="evaluation")
        scorer, verifier = ranker.open(ctx.device, fetch=local_model), Verifier()
        shown = report_prompts(rows, cfg.report_prompts)
        results: EvalResults = {"eval_run_id": run_id, "metrics": {}, "examples": [
            {"prompt": rows[i]["prompt"][-1]["content"], "task": rows[i]["task"],
             "reference": rows[i]["completion"][0]["content"], "answers": {}} for i in shown]}
        samples = {"model": [], "prompt": [], "reference": [], "answer": [], "correct": []}
        correct: dict[str, np.ndarray] = {}
        judged: dict[str, list[float]] = {}
        prompts = [r["prompt"] for r in rows]
        references = [r["completion"][0]["content"] for r in rows]
        for name, ref in models.items():
            template, answers, sampled = answer(cfg, ref, prompts, ctx.device, name, ctx.seed, cfg.pass_k)
            mlflow.set_tag(f"alignflow.chat_template.{name}", template)
            texts = [a["text"] for a in answers]
            correct[name] = correctness(rows, answers)
            rewards = scorer.score(prompts, texts, references)
            metrics = by_task(rows, correct[name], "accuracy") | {
                "mean_reward": sum(rewards) / len(rows), "eos_rate": sum(a["ended"] for a in answers) / len(rows),
                "mean_words": sum(len(t.split()) for t in texts) / len(rows)}
            low, high = bootstrap_ci(correct[name], cfg.bootstrap, ctx.seed)
            metrics |= {"accuracy_ci95_low": low, "accuracy_ci95_high": high}
            # the win rate is judged by the verifier whatever ranked the pairs, unless the config says ranker
            judged[name] = rewards if isinstance(ranker, Verifier) or cfg.win_rate_by == "ranker" else \
                verifier.score(prompts, texts, references)
            if sampled is not None:
                metrics |= pass_at_k(rows, sampled, cfg.pass_k)
            results["metrics"][name] = metrics
            for example, i in zip(results["examples"], shown):
                example["answers"][name] = answers[i]["text"]
            logger.info("%s: accuracy %.3f [%.3f, %.3f], mean reward %.3f", name, metrics["accuracy"], low, high,
                        metrics["mean_reward"])
            for row, a, hit in list(zip(rows, answers, correct[name]))[: cfg.samples_logged]:
                samples["model"].append(name)
                samples["prompt"].append(row["prompt"][-1]["content"])
                samples["reference"].append(row["completion"][0]["content"])
                samples["answer"].append(a["text"])
                samples["correct"].append(bool(hit))
        if "sft" in models:
            for name in models:
                if name not in ("sft", "base"):
                    results["metrics"][name] |= versus(correct[name], correct["sft"], judged[name], judged["sft"],
                                                       cfg.bootstrap, ctx.seed)
        results["correct"] = {name: c.tolist() for name, c in correct.items()}  # per prompt, for promotion
        flat = eval_metrics(results)
        log_metrics(run_id, flat)
        log_metrics(ctx.parent_run_id, flat)  # the parent run carries the comparison columns
        mlflow.log_table(samples, "eval_samples.json")
        mlflow.log_dict(results, "eval_results.json")
        return results


register(Stage(name="evaluate", task=evaluate, config={"cfg": "eval", "rank_cfg": "rank"},
               inputs={"models": MODELS, "data": "load_data.eval"},
               describe="every model on the same held-out prompts"))
