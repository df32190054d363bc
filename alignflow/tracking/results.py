"""The evaluation's result schema: what the evaluate stage returns and records (`eval_results.json`),
and how it becomes the parent run's metric columns."""

from __future__ import annotations

from typing import TypedDict


class Example(TypedDict):
    prompt: str
    task: str
    reference: str
    answers: dict[str, str]  # model label -> greedy answer
    label: str  # why it is shown: "random" (seeded draw) or "SFT and DPO differ"


class EvalResults(TypedDict, total=False):
    eval_run_id: str  # the evaluate stage's MLflow run
    metrics: dict[str, dict[str, float]]  # model label -> metric name -> value
    examples: list[Example]  # the same prompts answered by every model, for the report
    correct: dict[str, list[float]]  # model label -> 1.0/0.0 per eval prompt (promotion's paired test)
    promotion: dict  # added by the flow: the promote stage's decision
    report: str  # added by the flow: the report's path


def eval_metrics(results: EvalResults) -> dict[str, float]:
    """Evaluate's results as the parent run's metric columns: `<model>.<metric>`."""
    return {f"{name}.{k}": v for name, m in results["metrics"].items() for k, v in m.items()}
