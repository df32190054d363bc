"""Stage 6: every model on the same held-out prompts with the same greedy decoding.

Metrics have stable names (`<model>.accuracy`, `<model>.accuracy.<task>`, `<model>.mean_reward`,
`<model>.eos_rate`, `<model>.mean_words`) on both the evaluate run and the parent run, so runs
compare column for column in the MLflow UI.
"""

from __future__ import annotations

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import EvalSection, RankSection
from alignflow.data import read_jsonl
from alignflow.modeling import generate, load_causal_lm, load_tokenizer
from alignflow.rankers import Verifier, is_correct, make_ranker
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, stage_run
from tasks import stage_logger


def score_answers(rows: list[dict], answers: list[dict], ranker) -> dict[str, float]:
    references = [r["completion"][0]["content"] for r in rows]
    correct = [is_correct(a["text"], ref) for a, ref in zip(answers, references)]
    rewards = ranker.score([r["prompt"] for r in rows], [a["text"] for a in answers], references)
    metrics = {"accuracy": sum(correct) / len(rows), "mean_reward": sum(rewards) / len(rows),
               "eos_rate": sum(a["ended"] for a in answers) / len(rows),
               "mean_words": sum(len(a["text"].split()) for a in answers) / len(rows)}
    for task_name in sorted({r["task"] for r in rows}):
        hits = [c for c, r in zip(correct, rows) if r["task"] == task_name]
        metrics[f"accuracy.{task_name}"] = sum(hits) / len(hits)
    return metrics


@task(name="evaluate", cache_policy=NONE)
def evaluate(cfg: EvalSection, models: dict[str, ModelRef], data: DatasetRef, ctx: RunContext,
             rank_cfg: RankSection | None = None) -> dict:
    logger = stage_logger()
    params = flatten({**cfg.model_dump(exclude={"data"}), **{f"model.{k}": m.uri for k, m in models.items()}},
                     "eval")
    with stage_run(ctx, "evaluate", params) as run_id:
        rows = read_jsonl(data.resolve())
        log_dataset(rows, source=data.uri, name="eval", context="evaluation")
        ranker = make_ranker(rank_cfg, ctx.device) if rank_cfg else Verifier()
        prompts = [r["prompt"] for r in rows] + [[{"role": "user", "content": cfg.demo_prompt}]]
        results: dict = {"metrics": {}, "demo_prompt": cfg.demo_prompt, "demo_answers": {}}
        samples = {"model": [], "prompt": [], "reference": [], "answer": [], "correct": []}
        for name, ref in models.items():
            path = ref.resolve()
            answers = generate(load_causal_lm(path, ctx.device), load_tokenizer(path), prompts,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=f"eval {name}")
            answers = [a[0] for a in answers]
            results["demo_answers"][name] = answers[-1]["text"]
            metrics = score_answers(rows, answers[:-1], ranker)
            results["metrics"][name] = metrics
            logger.info("%s: accuracy %.3f, mean reward %.3f", name, metrics["accuracy"], metrics["mean_reward"])
            for row, answer in list(zip(rows, answers))[: cfg.samples_logged]:
                reference = row["completion"][0]["content"]
                samples["model"].append(name)
                samples["prompt"].append(row["prompt"][-1]["content"])
                samples["reference"].append(reference)
                samples["answer"].append(answer["text"])
                samples["correct"].append(is_correct(answer["text"], reference))
        flat = {f"{name}.{k}": v for name, m in results["metrics"].items() for k, v in m.items()}
        log_metrics(run_id, flat)
        log_metrics(ctx.parent_run_id, flat)  # the parent run carries the comparison columns
        mlflow.log_table(samples, "eval_samples.json")
        mlflow.log_dict(results, "eval_results.json")
        return results
