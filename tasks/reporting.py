"""The run report: one markdown file with PNG plots, built from what MLflow holds for a parent run.

    alignflow report RUN_ID [--out DIR]      # rebuild the report of any finished run

Everything in it is read back through MlflowClient (metrics, metric histories, logged tables), so
its numbers are the MLflow numbers by construction and any run, old or remote, can be reported.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402



def model_order(names) -> list[str]:
    """Evaluated models in stage order (tasks.stages: base, sft, dpo, its baselines), each
    preference stage's earlier rounds just before its final model; unknown labels last."""
    from tasks import stages

    labels = list(stages.evaluated())

    def key(name: str):
        earlier = stages.parse_round_label(name)
        label, round_ = earlier if earlier and earlier[0] in labels else (name, 10**6)
        return (labels.index(label) if label in labels else len(labels), round_, name)

    return sorted(names, key=key)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_ci(get, metric: str) -> str:
    if get(metric) is None:
        return "–"
    return f"{_fmt(get(metric))} [{_fmt(get(metric + '_ci95_low'))}, {_fmt(get(metric + '_ci95_high'))}]"


def _agreements(metrics: dict) -> str:
    """`verifier 0.812 (κ 0.640)` for each ranker the rank stage compared its ranking with."""
    others = sorted(k.removeprefix("agreement.") for k in metrics if k.startswith("agreement."))
    return " / ".join(f"{o} {_fmt(metrics[f'agreement.{o}'])} (κ {_fmt(metrics.get(f'kappa.{o}'))})"
                      for o in others) or "–"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ⏎ ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _load_table(run_id: str, name: str) -> list[dict]:
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{name}")
    return [dict(zip(table["columns"], row)) for row in table["data"]]


class RunRecords:
    """A parent run's MLflow records: its metrics and its stage runs by name."""

    def __init__(self, parent_run_id: str, client: MlflowClient | None = None):
        self.client = client or MlflowClient()
        self.parent = self.client.get_run(parent_run_id)
        children = self.client.search_runs([self.parent.info.experiment_id],
                                           f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)
        self.stages, self.cached = {}, {}
        self.children = sorted(children, key=lambda r: r.info.start_time)
        for run in self.children:
            source = run.data.tags.get("alignflow.cache_source_run")
            if source:  # a cache hit: its records are the source run's
                self.cached[run.info.run_name] = source
            self.stages[run.info.run_name] = self.client.get_run(source) if source else run
        self.metrics = self.parent.data.metrics

    def history(self, stage: str, key: str) -> tuple[list[int], list[float]]:
        points = sorted(self.client.get_metric_history(self.stages[stage].info.run_id, key), key=lambda m: m.step)
        return [m.step for m in points], [m.value for m in points]

    def models(self) -> list[str]:
        """Evaluated models in stage order: base, sft, dpo rounds, dpo, baselines."""
        return model_order({k.split(".")[0] for k in self.metrics
                            if k.endswith((".accuracy", ".eos_rate")) and k.count(".") == 1})

    def tasks(self) -> list[str]:
        return sorted({k.split(".", 2)[2] for k in self.metrics if k.startswith("sft.accuracy.")})

    def pass_k(self) -> str | None:
        keys = [k.split(".")[1] for k in self.metrics if k.startswith("sft.pass_at_") and k.count(".") == 1]
        return keys[0] if keys else None


def build_report(parent_run_id: str, out_dir: str | Path, client: MlflowClient | None = None) -> Path:
    """Write report.md and its PNGs into out_dir; returns the markdown file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = RunRecords(parent_run_id, client)
    m, models, tasks, pk = rec.metrics, rec.models(), rec.tasks(), rec.pass_k()
    get = lambda key: m.get(key)  # noqa: E731
    sections = [f"# alignflow run report: {rec.parent.info.run_name}",
                f"MLflow parent run `{parent_run_id}` (experiment `{rec.parent.info.experiment_id}`), config hash "
                f"`{rec.parent.data.tags.get('alignflow.config_hash', '?')}`, git "
                f"`{rec.parent.data.tags.get('alignflow.git_commit', '?')[:12]}`. Held-out eval, greedy decoding; "
                "intervals are 95% bootstrap over eval prompts."]

    header = ["model", "accuracy", "95% CI"] + ([pk.replace("_at_", "@")] if pk else []) + [
        "mean reward", "EOS rate (vs SFT)", "mean tokens (× SFT)", "repetition rate (vs SFT)", "mean words",
        "win rate vs SFT [95% CI]", "LC win rate", "Δ acc vs SFT [95% CI]"]
    rows = []
    for name in models:
        delta = get(f"{name}.delta_vs_sft")
        change = lambda key: "" if get(key) is None else f" ({get(key):+.3f})"  # noqa: E731
        ratio = get(f"{name}.length_ratio_vs_sft")
        rows.append([f"**{name}**", _fmt(get(f"{name}.accuracy")),
                     f"[{_fmt(get(f'{name}.accuracy_ci95_low'))}, {_fmt(get(f'{name}.accuracy_ci95_high'))}]"]
                    + ([_fmt(get(f"{name}.{pk}"))] if pk else [])
                    + [_fmt(get(f"{name}.mean_reward")),
                       _fmt(get(f"{name}.eos_rate")) + change(f"{name}.eos_rate_change_vs_sft"),
                       _fmt(get(f"{name}.mean_tokens"), 1) + ("" if ratio is None else f" ({ratio:.2f}×)"),
                       _fmt(get(f"{name}.repetition_rate")) + change(f"{name}.repetition_rate_change_vs_sft"),
                       _fmt(get(f"{name}.mean_words"), 2),
                       _with_ci(get, f"{name}.win_rate_vs_sft"), _fmt(get(f"{name}.lc_win_rate_vs_sft")),
                       "–" if delta is None else f"{delta:+.3f} [{_fmt(get(f'{name}.delta_vs_sft_ci95_low'))}, "
                                                 f"{_fmt(get(f'{name}.delta_vs_sft_ci95_high'))}]"])
    sections += ["## Models", _md_table(header, rows),
                 "Repetition rate: the share of answers that repeat themselves (seq-rep over character 8-grams, "
                 "shorter ones for short answers, ≥ 0.5: alignflow.health.repetition); EOS rate: the share that "
                 "ended on their own; mean tokens: answer length in the model's own tokens."]
    sections += promotion_section(rec) + warning_section(rec)
    sections += ["## Stage runs", _md_table(["stage", "MLflow run", "status", "seconds", "cached"], stage_rows(rec))]
    if rec.cached:
        sections.append("Reused from earlier runs (config, input digests and code unchanged): " + ", ".join(
            f"`{stage}` (run `{source}`)" for stage, source in rec.cached.items()) + ".")

    if tasks:  # accuracy needs reference answers; open-ended eval prompts have the win rates above only
        task_header = ["task"] + [f"{n} greedy" + (f" / {pk.replace('_at_', '@')}" if pk else "") for n in models]
        task_rows = [[t] + [_fmt(get(f"{n}.accuracy.{t}")) + (f" / {_fmt(get(f'{n}.{pk}.{t}'))}" if pk else "")
                            for n in models] for t in tasks]
        sections += ["## Accuracy per task type", _md_table(task_header, task_rows),
                     "![accuracy per task type](accuracy_by_task.png)"]
        _plot_tasks(rec, models, tasks, out / "accuracy_by_task.png")
        sections += flaw_section(rec, models, tasks, out / "flaws.png")
        sections += constraint_section(rec, models, out / "constraints_by_type.png")

    if "select_base" in rec.stages:
        table = _load_table(rec.stages["select_base"].info.run_id, "candidates.json")
        measure = rec.stages["select_base"].data.tags.get("alignflow.selection_measure", "answer_bits_per_byte")
        sections += ["## Base-model selection", _md_table(
            ["candidate", "parameters", "train memory (GB)", "within budget", measure.replace("_", " "),
             "chat template", "chosen"],
            [[e["candidate"], f"{e['params']:,}", e["train_memory_gb"], e["within_budget"], _fmt(e.get(measure), 4),
              e.get("chat_template", ""), "✔" if e.get("chosen") else ""] for e in table])]

    rank_stages = [s for s in rec.stages if s == "rank" or s.startswith("rank.")]
    if rank_stages:
        pair_rows, margins = [], {}
        for stage in rank_stages:
            sm = rec.stages[stage].data.metrics
            pair_rows.append([stage, int(sm.get("pairs", 0)), int(sm.get("ties", 0)), _fmt(sm.get("tie_rate")),
                              _fmt(sm.get("mean_margin")), _fmt(sm.get("chosen_mean_reward")),
                              _fmt(sm.get("rejected_mean_reward")), _fmt(sm.get("chosen_mean_words"), 2),
                              _fmt(sm.get("rejected_mean_words"), 2), _fmt(sm.get("judge.consistency_rate")),
                              _agreements(sm)])
            table = _load_table(rec.stages[stage].info.run_id, "pairs_table.json")
            # the ranker's pairs: mixed-in dpo.data pairs may carry no margin
            margins[stage] = [p["margin"] for p in table if p["margin"] is not None and not math.isnan(p["margin"])]
        _plot_margins(margins, out / "pair_margins.png")
        sections += ["## Preference pairs", _md_table(
            ["ranking", "pairs", "ties", "tie rate", "mean margin", "chosen reward", "rejected reward",
             "chosen words", "rejected words", "judge consistency", "agreement with"], pair_rows),
            "Judge consistency: the share of candidate pairs an LLM judge ordered the same way in both orders "
            "(others are ties). Agreement: the share of candidate pairs the ranker orders as another ranker "
            "does, with Cohen's kappa (0 = chance).", "![pair margins](pair_margins.png)"]

    curves = []
    if "sft" in rec.stages and _plot_curves(rec, ["sft"], [("loss", "train loss")], out / "sft_loss.png"):
        curves.append("![SFT loss](sft_loss.png)")
    from tasks import stages

    registry = stages.stages()

    def trains_on(run_name: str, data: str) -> bool:
        """Whether a child run is of a training stage that takes the input `data` (pairs: offline; prompts: online)."""
        stage = registry.get(run_name.split(".")[0])
        return stage is not None and stage.trains and data in stage.inputs

    trained = [s for s in rec.stages if trains_on(s, "pairs")]
    # rewards/chosen and /rejected: beta x the log-prob shift from the reference that the training watch reads
    if trained and _plot_curves(rec, trained, [("rewards/margins", "reward margin"),
                                               ("rewards/chosen", "chosen reward (β × log-prob shift)"),
                                               ("rewards/rejected", "rejected reward (β × log-prob shift)"),
                                               ("rewards/accuracies", "reward accuracy"), ("loss", "train loss")],
                                out / "dpo_curves.png"):
        curves.append("![preference training](dpo_curves.png)")
    # online RL: what GRPO's users watch, per step (TRL's own metrics); a group whose completions all score the same
    # gives no learning signal
    online = [s for s in rec.stages if trains_on(s, "prompts")]
    if online and _plot_curves(rec, online, [("reward", "mean reward"), ("reward_std", "reward spread (std)"),
                                             ("frac_reward_zero_std", "groups with no reward spread"),
                                             ("completions/mean_length", "completion length (tokens)"),
                                             ("completions/clipped_ratio", "truncated share"), ("kl", "KL")],
                               out / "grpo_curves.png"):
        curves.append("![online RL](grpo_curves.png)")
    if curves:
        sections += ["## Training curves", *curves]

    results = _eval_results(rec)
    if results and results.get("examples"):
        shown = [n for n in models if n in results["examples"][0]["answers"]]
        sections += ["## Same prompts, every model",
                     "Prompts drawn at random (seeded by the run's seed); the last, where marked, is drawn among "
                     "the prompts where SFT and DPO answer differently.", _md_table(
            ["shown", "task", "prompt", "reference", *shown],
            [[e.get("label", "random"), e["task"], e["prompt"], e["reference"], *(repr(e["answers"][n]) for n in shown)]
             for e in results["examples"]])]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


FLAW_NAMES = {"wrong": "wrong value", "verbose": "verbose", "runon": "run-on"}


def flaw_section(rec: RunRecords, models: list[str], tasks: list[str], plot: Path) -> list[str]:
    """What the preference stage changed: the share of held-out answers with each flaw (alignflow.stats
    .flaw_of) per model, and per task type before (SFT) and after (DPO); the SFT data's own flaws
    when it declared them (the embedded suite's `embedded.flaws`)."""
    from alignflow.stats import FLAWS

    m = rec.metrics
    if not all(f"{n}.flaw_wrong" in m for n in ("sft", "dpo")):
        return []
    lines = ["## What the preference stage changed",
             "Each held-out answer (greedy) is exact, or has one flaw: a **wrong value**, **verbose** (the right "
             "value, then rambling past it) or **run-on** (the right value said again and again, no end of turn)."]
    data = rec.stages["load_data"].data.metrics if "load_data" in rec.stages else {}
    declared = {k: data[f"sft.flaw_share.{k}"] for k in FLAWS if data.get(f"sft.flaw_share.{k}")}
    if declared:
        lines.append("The SFT demonstrations had " + ", ".join(f"{v:.0%} {FLAW_NAMES[k]}" for k, v in declared.items())
                     + " answers; sampling prompts and held-out prompts are clean.")
    lines.append(_md_table(["model", "exact", *(FLAW_NAMES[k] for k in FLAWS), "EOS rate"],
                           [[f"**{n}**", _fmt(m.get(f"{n}.accuracy")), *(_fmt(m.get(f"{n}.flaw_{k}")) for k in FLAWS),
                             _fmt(m.get(f"{n}.eos_rate"))] for n in models if f"{n}.flaw_wrong" in m]))
    lines.append(_md_table(["task", "exact SFT → DPO", *(f"{FLAW_NAMES[k]} SFT → DPO" for k in FLAWS)],
                           [[t, *(f"{_fmt(m.get(f'sft.{key}.{t}'))} → {_fmt(m.get(f'dpo.{key}.{t}'))}"
                                  for key in ["accuracy", *(f"flaw_{k}" for k in FLAWS)])] for t in tasks]))
    _plot_flaws(m, [n for n in models if f"{n}.flaw_wrong" in m], plot)
    lines.append(f"![answers by flaw]({plot.name})")
    return lines


def promotion_section(rec: RunRecords) -> list[str]:
    """The registry's decision: promoted, kept, or refused with its reasons (right under the model table,
    since a refused model is what a reader must see first)."""
    m = rec.metrics
    if "promotion.promoted" not in m:
        return []
    p = {k.removeprefix("promotion."): v for k, v in m.items() if k.startswith("promotion.")}
    decision = rec.parent.data.tags.get("alignflow.promotion", "?")
    champion = f"v{int(p['champion_version'])}" if "champion_version" in p else "none yet"
    line = (f"**{decision}**: challenger v{int(p['challenger_version'])}, champion {champion} "
            f"(MLflow Model Registry; SFT model v{int(p.get('sft_version', 0))}).")
    reason = rec.parent.data.tags.get("alignflow.promotion_reason")
    if reason:
        line += " Refused, judged against its own SFT model on these eval prompts: " + "; ".join(
            f"**{r}**" for r in reason.split("\n")) + "."
    if "delta" in p:
        line += (f" Challenger {_fmt(p['challenger_accuracy'])} vs champion v{int(p['previous_champion_version'])} "
                 f"{_fmt(p['champion_accuracy'])} on these eval prompts: Δ {p['delta']:+.3f} "
                 f"[{_fmt(p['delta_ci95_low'])}, {_fmt(p['delta_ci95_high'])}]; the champion moves only if "
                 "the interval's lower bound is above the configured minimum gain.")
    return ["## Promotion", line]


def warning_section(rec: RunRecords) -> list[str]:
    """What the preference stages' watch (alignflow.health.preference_watch) warned of, stage by stage, with
    the numbers behind it: chosen/rejected log-prob trends and the pairs' length gap."""
    watched = {name: run for name, run in rec.stages.items() if "watch.warnings" in run.data.metrics}
    if not watched:
        return []
    rows = []
    for name, run in watched.items():
        wm = run.data.metrics
        trend = lambda side: (_fmt(wm.get(f"watch.{side}_logp_start"), 2) + " → "  # noqa: E731
                              + _fmt(wm.get(f"watch.{side}_logp_end"), 2))
        rows.append([name, _fmt(wm.get("watch.chosen_logp_shift_per_token")),
                     _fmt(wm.get("watch.rejected_logp_shift_per_token")), trend("chosen"), trend("rejected"),
                     _fmt(wm.get("watch.length_ratio"), 2), int(wm["watch.warnings"])])
    lines = ["## Preference training watch",
             "How far training moved the policy's log-prob of the chosen and rejected answers from the reference "
             "model's, per token of the chosen answers, at the end of training (TRL's `rewards/*` ÷ beta: the same "
             "answers under both models); TRL's logged log-probs (`logps/*`, summed over an answer's tokens, first → "
             "last quarter of training: different batches); the chosen answers' mean length over the rejected ones'.",
             _md_table(["stage", "chosen shift per token", "rejected shift per token", "chosen log-prob",
                        "rejected log-prob", "length ratio", "warnings"], rows)]
    for name, run in watched.items():
        text = run.data.tags.get("alignflow.warnings")
        if text:
            lines += [f"⚠ **{name}**: {w}" for w in text.split("\n")]
    return lines


def _plot_flaws(m: dict, models: list[str], path: Path) -> None:
    from alignflow.stats import FLAWS

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(models)), 3.5))
    bottom = [0.0] * len(models)
    for key, label, color in [("accuracy", "exact", "#4c9a2a"), *((f"flaw_{k}", FLAW_NAMES[k], c) for k, c in
                                                                  zip(FLAWS, ["#c0392b", "#e67e22", "#8e44ad"]))]:
        values = [m.get(f"{n}.{key}", 0.0) for n in models]
        ax.bar(models, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("share of held-out answers")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage_rows(rec: RunRecords) -> list[list]:
    """One row per stage run of the flow run, in the registry's stage order (rounds in run order)."""
    from tasks import stages

    order = list(stages.stages())
    position = lambda run: order.index(run.data.tags.get("alignflow.stage", "").split(".")[0]) \
        if run.data.tags.get("alignflow.stage", "").split(".")[0] in order else len(order)  # noqa: E731
    rows = []
    for run in sorted(rec.children, key=lambda r: (position(r), r.info.start_time)):
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
        rows.append([run.info.run_name, f"`{run.info.run_id[:12]}`", run.info.status, _fmt(seconds, 1),
                     "✔" if run.data.tags.get("alignflow.cache_hit") == "true" else ""])
    return rows


def constraint_section(rec: RunRecords, models: list[str], plot: Path) -> list[str]:
    """IFEval's accuracies (prompt and instruction level, strict and loose) and instruction-level strict
    accuracy per constraint type, when the eval prompts carried constraints (alignflow.constraints)."""
    m = rec.metrics
    if "sft.instruction_accuracy" not in m:
        return []
    prefix = "sft.instruction_accuracy."
    types = sorted(k[len(prefix):] for k in m if k.startswith(prefix))
    levels = [("accuracy", "prompt strict"), ("accuracy_loose", "prompt loose"),
              ("instruction_accuracy", "instruction strict"), ("instruction_accuracy_loose", "instruction loose")]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(types) + 2), 3.8))
    width = 0.8 / max(1, len(models))
    for i, name in enumerate(models):
        ax.bar([t + i * width for t in range(len(types))],
               [m.get(f"{name}.instruction_accuracy.{t}", 0) for t in types], width, label=name)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(types))], [t.split(".", 1)[1] for t in types],
                  rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share met (strict)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=min(4, len(models)))
    fig.tight_layout()
    fig.savefig(plot, dpi=90)
    plt.close(fig)
    return ["## Verifiable constraints (IFEval's accuracies)",
            _md_table(["model", *(label for _, label in levels)],
                      [[f"**{n}**", *(_fmt(m.get(f"{n}.{key}")) for key, _ in levels)] for n in models]),
            _md_table(["constraint type", *models],
                      [[t, *(_fmt(m.get(f"{n}.instruction_accuracy.{t}")) for n in models)] for t in types]),
            f"![constraints met per type]({plot.name})"]


def _eval_results(rec: RunRecords) -> dict | None:
    if "evaluate" not in rec.stages:
        return None
    return mlflow.artifacts.load_dict(f"runs:/{rec.stages['evaluate'].info.run_id}/eval_results.json")


def _plot_tasks(rec: RunRecords, models: list[str], tasks: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 3.5))
    width = 0.8 / max(1, len(models))
    for i, name in enumerate(models):
        ax.bar([t + i * width for t in range(len(tasks))], [rec.metrics.get(f"{name}.accuracy.{t}", 0) for t in tasks],
               width, label=name)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("greedy accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=min(4, len(models)))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_margins(margins: dict[str, list[float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(list(margins.values()), bins=20, label=list(margins), range=(0, 1))
    ax.set_xlabel("reward margin (chosen − rejected)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_curves(rec: RunRecords, stages: list[str], keys: list[tuple[str, str]], path: Path) -> bool:
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    drawn = False
    for ax, (key, label) in zip(axes[0], keys):
        for stage in stages:
            steps, values = rec.history(stage, key)
            if steps:
                ax.plot(steps, values, label=stage)
                drawn = True
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn
