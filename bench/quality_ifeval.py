"""The constraint recipe's section of docs/results.md (issue 25): configs/smollm2-ifeval.yaml over seeds,
judged against the issue's goals. Called by `python bench/quality.py --ifeval` (see there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- quality-ifeval:begin -->", "<!-- quality-ifeval:end -->"
MODELS = ["base", "sft", "dpo", "rft", "grpo"]  # those a run evaluated, in this order


def f3(x: float) -> str:
    return f"{x:.3f}"


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def per_prompt(client, run) -> dict:
    """The evaluate stage's per-prompt correctness and task of a flow run (its eval_results.json)."""
    import mlflow

    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                                  "tags.`alignflow.stage` = 'evaluate'", max_results=5)
    path = mlflow.artifacts.download_artifacts(f"runs:/{children[0].info.run_id}/eval_results.json")
    results = json.loads(Path(path).read_text())
    return {"correct": results["correct"], "tasks": results["tasks"]}


def stage_minutes(client, run) -> dict:
    """Each stage's wall time in minutes (its MLflow child run, start to end) of a flow run."""
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                  max_results=200)
    return {c.data.tags.get("alignflow.stage", c.info.run_name): (c.info.end_time - c.info.start_time) / 60000
            for c in children if c.info.end_time}


def pooled_delta(rows: list[dict], task: str, first: str, second: str,
                 resamples: int = 2000) -> tuple[float, float, float]:
    """first − second on one task's prompts, all seeds pooled, with a paired 95% bootstrap interval."""
    from alignflow.stats import bootstrap_ci

    diffs = np.concatenate([np.array(r["prompts"]["correct"][first]) - np.array(r["prompts"]["correct"][second])
                            for r in rows])
    tasks = np.concatenate([np.array(r["prompts"]["tasks"]) for r in rows])
    part = diffs[tasks == task]
    low, high = bootstrap_ci(part, resamples, 0)
    return float(part.mean()), low, high


def goal_lines(rows: list[dict]) -> list[str]:
    d = lambda r, t="seen": r[f"dpo.delta_vs_sft.{t}"]  # noqa: E731
    held = pooled_delta(rows, "held_out", "dpo", "sft")
    seen_rft = pooled_delta(rows, "seen", "dpo", "rft")
    checks = [
        ("DPO ≥ SFT + 0.08 (seen types, prompt-level strict) in every seed", all(d(r) >= 0.08 for r in rows),
         ", ".join(f"{d(r):+.3f}" for r in rows)),
        ("paired 95% interval of DPO − SFT (seen) above 0 in every seed",
         all(r["dpo.delta_vs_sft_ci95_low.seen"] > 0 for r in rows),
         ", ".join(f"[{f3(r['dpo.delta_vs_sft_ci95_low.seen'])}, {f3(r['dpo.delta_vs_sft_ci95_high.seen'])}]"
                   for r in rows)),
        ("DPO ≥ SFT + 0.12 (seen, mean of seeds)", np.mean([d(r) for r in rows]) >= 0.12,
         f"{np.mean([d(r) for r in rows]):+.3f}"),
        ("DPO > SFT on held-out types (paired interval above 0, seeds pooled)", held[1] > 0,
         f"{held[0]:+.3f} [{f3(held[1])}, {f3(held[2])}]"),
        ("DPO ≥ RFT (seen, mean)", seen_rft[0] >= 0, f"{seen_rft[0]:+.3f} [{f3(seen_rft[1])}, {f3(seen_rft[2])}]"),
        ("mean length within ±30% of SFT's (every seed)",
         all(0.7 <= r["dpo.mean_words"] / r["sft.mean_words"] <= 1.3 for r in rows),
         ", ".join(f"{r['dpo.mean_words'] / r['sft.mean_words']:.2f}×" for r in rows)),
        ("repetition not up (every seed)", all(r["dpo.repetition_rate"] <= r["sft.repetition_rate"] for r in rows),
         ", ".join(f"{r['dpo.repetition_rate'] - r['sft.repetition_rate']:+.3f}" for r in rows)),
        ("EOS rate ≥ SFT's (every seed)", all(r["dpo.eos_rate"] >= r["sft.eos_rate"] for r in rows),
         ", ".join(f"{r['dpo.eos_rate'] - r['sft.eos_rate']:+.3f}" for r in rows)),
        ("the promotion rules pass the DPO model (every seed)", all(r["promotion"][0] for r in rows),
         ", ".join(r["promotion"][1] for r in rows)),
    ]
    lines = ["| goal | met | value |", "|---|---|---|"] + [f"| {g} | {'yes' if ok else '**no**'} | {v} |"
                                                           for g, ok, v in checks]
    if "grpo.accuracy" in rows[0]:  # online RL on the same reward beside them (issue 27): no goal, the comparison
        lines += ["", "| comparison (seeds pooled) | seen | held-out types |", "|---|---|---|"]
        for first, second in (("grpo", "sft"), ("grpo", "dpo"), ("grpo", "rft")):
            cells = [pooled_delta(rows, task, first, second) for task in ("seen", "held_out")]
            lines.append(f"| {first.upper()} − {second.upper()} | " + " | ".join(
                f"{c[0]:+.3f} [{f3(c[1])}, {f3(c[2])}]" for c in cells) + " |")
    return lines


def section(rows: list[dict], command: str, machine: str, wall: float) -> list[str]:
    models = [m for m in MODELS if f"{m}.accuracy" in rows[0]]
    walls = ", ".join(f"{r['wall_s'] / 60:.1f}" for r in rows)
    out = [BEGIN, f"## Verifiable instruction following: smollm2-ifeval.yaml; seeds {[r['seed'] for r in rows]}", "",
           f"- command: `{command}`", f"- machine: {machine}",
           f"- wall time: {wall / 60:.1f} min for {len(rows)} flow runs, one after another "
           f"({walls} min each)",
           "- held-out eval: unseen topics; `seen` = constraint types trained on, `held_out` = types never in SFT or "
           "sampling; greedy; prompt-level strict accuracy (every constraint met) unless named; [a, b] = 95% "
           "bootstrap interval over prompts", "", "### Goal (issue 25)", "", *goal_lines(rows), "",
           "### Prompt-level strict accuracy per seed: seen types / held-out types", "",
           "| seed | " + " | ".join(models) + " | DPO − SFT seen [95% CI] | MLflow run |",
           "|" + "---|" * (len(models) + 3)]
    both = lambda get: " / ".join(f3(get(t)) for t in ("seen", "held_out"))  # noqa: E731
    for r in rows:
        out.append(f"| {r['seed']} | " + " | ".join(both(lambda t: r[f"{m}.accuracy.{t}"]) for m in models)
                   + f" | {r['dpo.delta_vs_sft.seen']:+.3f} [{f3(r['dpo.delta_vs_sft_ci95_low.seen'])}, "
                   f"{f3(r['dpo.delta_vs_sft_ci95_high.seen'])}] | `{r['run_id'][:12]}` |")
    out.append("| mean | " + " | ".join(both(lambda t: mean(rows, f"{m}.accuracy.{t}")) for m in models)
               + f" | {np.mean([r['dpo.delta_vs_sft.seen'] for r in rows]):+.3f} | |")
    out += ["", "### IFEval's other accuracies (mean over seeds)", "",
            "| model | prompt strict | prompt loose | instruction strict | instruction loose |",
            "|---|---|---|---|---|"]
    out += [f"| {m} | {f3(mean(rows, f'{m}.accuracy'))} | {f3(mean(rows, f'{m}.accuracy_loose'))} | "
            f"{f3(mean(rows, f'{m}.instruction_accuracy'))} | {f3(mean(rows, f'{m}.instruction_accuracy_loose'))} |"
            for m in models]
    types = sorted(k.split(".", 2)[2] for k in rows[0] if k.startswith("sft.instruction_accuracy."))
    held = {t.replace(":", ".") for t in held_out_types()}
    out += ["", "### Instruction-level strict accuracy per constraint type (mean over seeds; * held out)", "",
            "| type | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    out += [f"| {t}{' *' if t in held else ''} | "
            + " | ".join(f3(mean(rows, f"{m}.instruction_accuracy.{t}")) for m in models) + " |" for t in types]
    out += ["", "### Length, repetition, EOS (mean over seeds)", "",
            "| model | mean words | mean tokens | repetition rate | EOS rate |", "|---|---|---|---|---|"]
    out += [f"| {m} | {mean(rows, f'{m}.mean_words'):.1f} | {mean(rows, f'{m}.mean_tokens'):.1f} | "
            f"{f3(mean(rows, f'{m}.repetition_rate'))} | {f3(mean(rows, f'{m}.eos_rate'))} |" for m in models]
    if all("stages" in r for r in rows):
        from tasks import stages as registry

        order = list(registry.stages())  # the flow's order
        stages = sorted((s for s in rows[0]["stages"] if all(s in r["stages"] for r in rows)),
                        key=lambda s: order.index(s) if s in order else len(order))
        out += ["", "### Wall time per stage (minutes, per seed)", "", "| seed | " + " | ".join(stages) + " |",
                "|" + "---|" * (len(stages) + 1)]
        out += [f"| {r['seed']} | " + " | ".join(f"{r['stages'][s]:.1f}" for s in stages) + " |" for r in rows]
    out.append(END)
    return out


def held_out_types() -> list[str]:
    from alignflow.embedded.constraints import HELD_OUT_TYPES

    return HELD_OUT_TYPES


def promotion(run) -> tuple[bool, str]:
    """Whether the promotion rules passed the DPO model (not refused: no worse than SFT, not degenerate), and
    the decision (a later seed's model may pass and still keep an earlier champion)."""
    decision = run.data.tags.get("alignflow.promotion", "no promote stage")
    return decision not in ("refused", "no promote stage"), decision
