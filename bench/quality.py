"""Quality benchmark: the shipped default (flawed demonstrations) and the clean suite over several
seeds, judged against issue #12's goal.

    python bench/quality.py                                  # both configs, seeds 0 1 2 -> docs/results.md
    python bench/quality.py --configs configs/default.yaml --seeds 0 --out /tmp/r.md dpo.trainer.beta=0.2
    python bench/quality.py --ifeval                         # configs/smollm2-ifeval.yaml, seeds 0 1 2 (issue 25)
    python bench/quality.py --ifeval --seeds 2 --save s2.json    # one seed's numbers kept, to put together later:
    python bench/quality.py --ifeval --from-saved s01.json s2.json --out docs/results.md

Each (config, seed) is one full flow run (same embedded data and base models per config, different
training and sampling seed) logged to MLflow (experiment `alignflow-quality` unless overridden); the
numbers in the results file are read back from those runs. The goal compares the first config (the
flawed default) with the second (the same suite, clean: its SFT model is what the flaws cost). When
the output file holds the markers `<!-- quality:begin -->` / `<!-- quality:end -->`, only the part
between them is replaced (the hand-written reading around it stays).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # the CPU's name where Linux gives it (platform.processor() is often empty there)
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def goal_lines(flawed: list[dict], clean: list[dict] | None) -> list[str]:
    """Issue #12's goal, per seed and on the mean: DPO well above the flawed SFT, most of the way back
    to the clean suite's SFT, and at least as good as RFT."""
    sft, dpo, rft = mean(flawed, "sft.accuracy"), mean(flawed, "dpo.accuracy"), mean(flawed, "rft.accuracy")
    checks = [
        ("DPO ≥ SFT + 0.10 in every seed", all(r["dpo.accuracy"] >= r["sft.accuracy"] + 0.10 for r in flawed),
         ", ".join(f"{r['dpo.accuracy'] - r['sft.accuracy']:+.3f}" for r in flawed)),
        ("paired 95% interval of DPO − SFT above 0 in every seed",
         all(r["dpo.delta_vs_sft_ci95_low"] > 0 for r in flawed),
         ", ".join(f"[{f3(r['dpo.delta_vs_sft_ci95_low'])}, {f3(r['dpo.delta_vs_sft_ci95_high'])}]" for r in flawed)),
    ]
    if clean:
        target = mean(clean, "sft.accuracy")
        recovered = (dpo - sft) / (target - sft) if target > sft else float("nan")
        checks.append((f"DPO recovers ≥ 80% of the gap to the clean suite's SFT (mean; clean SFT {f3(target)})",
                       recovered >= 0.8, f"{recovered:.0%} (flawed SFT {f3(sft)} → DPO {f3(dpo)})"))
    checks.append(("DPO ≥ RFT (mean)", dpo >= rft, f"{dpo - rft:+.3f} (RFT {f3(rft)})"))
    if "dpo_no_sft.accuracy" in flawed[0]:
        checks.append(("DPO ≥ DPO without the SFT term (mean)", dpo >= mean(flawed, "dpo_no_sft.accuracy"),
                       f"{dpo - mean(flawed, 'dpo_no_sft.accuracy'):+.3f}"))
    return ["| goal | met | value |", "|---|---|---|"] + [f"| {g} | {'yes' if ok else '**no**'} | {v} |"
                                                          for g, ok, v in checks]


def config_section(name: str, rows: list[dict]) -> list[str]:
    """One config's tables: accuracy per seed, per task type, and the answers' flaws (mean over seeds)."""
    from alignflow.stats import FLAWS
    from tasks.reporting import FLAW_NAMES, model_order

    models = model_order({k.split(".")[0] for k in rows[0] if k.endswith(".accuracy") and k.count(".") == 1})
    walls = ", ".join(f"{r['wall_s']:.0f} s" for r in rows)
    out = [f"### {name}: greedy accuracy per seed", "", f"Wall time per flow run: {walls}.", "",
           "| seed | " + " | ".join(models) + " | SFT pass@8 | DPO win rate vs SFT | DPO − SFT [95% CI] | MLflow run |",
           "|" + "---|" * (len(models) + 5)]
    for r in rows:
        cells = [f"{f3(r[f'{m}.accuracy'])} [{f3(r[f'{m}.accuracy_ci95_low'])}, {f3(r[f'{m}.accuracy_ci95_high'])}]"
                 for m in models]
        out.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {f3(r['sft.pass_at_8'])} | "
                   f"{f3(r['dpo.win_rate_vs_sft'])} | {r['dpo.delta_vs_sft']:+.3f} "
                   f"[{f3(r['dpo.delta_vs_sft_ci95_low'])}, {f3(r['dpo.delta_vs_sft_ci95_high'])}] "
                   f"| `{r['run_id'][:12]}` |")
    out.append("| mean | " + " | ".join(f3(mean(rows, f"{m}.accuracy")) for m in models) + " | "
               f"{f3(mean(rows, 'sft.pass_at_8'))} | {f3(mean(rows, 'dpo.win_rate_vs_sft'))} | "
               f"{mean(rows, 'dpo.delta_vs_sft'):+.3f} | |")
    tasks = sorted(k.split(".", 2)[2] for k in rows[0] if k.startswith("sft.accuracy."))
    out += ["", f"### {name}: per task type (mean over seeds), greedy / pass@8", "",
            "| task | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    for t in tasks:
        out.append(f"| {t} | " + " | ".join(
            f"{f3(mean(rows, f'{m}.accuracy.{t}'))} / {f3(mean(rows, f'{m}.pass_at_8.{t}'))}" for m in models) + " |")
    if all(f"{m}.flaw_wrong" in rows[0] for m in models):
        out += ["", f"### {name}: what is wrong with the answers (share of held-out answers, mean over seeds)", "",
                "| model | exact | " + " | ".join(FLAW_NAMES[k] for k in FLAWS) + " | EOS rate |",
                "|" + "---|" * (len(FLAWS) + 3)]
        out += [f"| {m} | {f3(mean(rows, f'{m}.accuracy'))} | "
                + " | ".join(f3(mean(rows, f"{m}.flaw_{k}")) for k in FLAWS) + f" | {f3(mean(rows, f'{m}.eos_rate'))} |"
                for m in models]
    if all(f"{m}.repetition_rate" in rows[0] for m in models):
        change = lambda m, key: f" ({mean(rows, f'{m}.{key}'):+.3f})" if f"{m}.{key}" in rows[0] else ""  # noqa: E731
        ratio = lambda m: f" ({mean(rows, f'{m}.length_ratio_vs_sft'):.2f}×)" if f"{m}.length_ratio_vs_sft" in rows[0] \
            else ""  # noqa: E731
        out += ["", f"### {name}: length, repetition and EOS (mean over seeds; in brackets against SFT)", "",
                "| model | mean tokens | mean words | repetition rate | EOS rate |", "|---|---|---|---|---|"]
        out += [f"| {m} | {mean(rows, f'{m}.mean_tokens'):.1f}{ratio(m)} | {mean(rows, f'{m}.mean_words'):.2f} | "
                f"{f3(mean(rows, f'{m}.repetition_rate'))}{change(m, 'repetition_rate_change_vs_sft')} | "
                f"{f3(mean(rows, f'{m}.eos_rate'))}{change(m, 'eos_rate_change_vs_sft')} |" for m in models]
    return out


def stage_watch(client, run) -> dict:
    """The preference stages' watch metrics (alignflow.health.preference_watch) of a flow run's child runs,
    as `<stage>.watch.*`."""
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                  max_results=200)
    return {f"{c.info.run_name}.{k}": v for c in children for k, v in c.data.metrics.items() if k.startswith("watch.")}


def watch_lines(name: str, rows: list[dict]) -> list[str]:
    stages = sorted({k.split(".watch.")[0] for k in rows[0] if ".watch." in k})
    if not stages:
        return []
    span = lambda key: (f"{min(r[key] for r in rows):+.3f} … {max(r[key] for r in rows):+.3f}"  # noqa: E731
                        if all(key in r for r in rows) else "–")
    out = ["", f"### {name}: preference training watch (lowest … highest over seeds)", "",
           "| stage | chosen log-prob shift per token | rejected shift per token | chosen/rejected length | warnings |",
           "|---|---|---|---|---|"]
    out += [f"| {s} | {span(f'{s}.watch.chosen_logp_shift_per_token')} | "
            f"{span(f'{s}.watch.rejected_logp_shift_per_token')} | {mean(rows, f'{s}.watch.length_ratio'):.2f} | "
            f"{int(sum(r.get(f'{s}.watch.warnings', 0) for r in rows))} |" for s in stages]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--ifeval", action="store_true",
                        help="the constraint recipe (default configs/smollm2-ifeval.yaml): its own section and goals")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--experiment", default="alignflow-quality")
    parser.add_argument("--from-runs", nargs="+", default=None, metavar="CONFIG=RUN_ID",
                        help="write the results from finished parent runs instead of running the flow")
    parser.add_argument("--save", default=None, metavar="JSON",
                        help="with --ifeval: also write each seed's numbers (per-prompt results included) to JSON, so "
                             "seeds run in different sessions can be put together with --from-saved")
    parser.add_argument("--from-saved", nargs="+", default=None, metavar="JSON",
                        help="with --ifeval: write the section from seeds saved by --save (no flow runs)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run (a lever to try)")
    args = parser.parse_args()
    args.configs = args.configs or ([str(ROOT / "configs" / "smollm2-ifeval.yaml")] if args.ifeval else
                                    [str(ROOT / "configs" / "default.yaml"), str(ROOT / "configs" / "clean.yaml")])

    from mlflow.tracking import MlflowClient

    from alignflow.config import load_config
    from alignflow.tracking import tracking_uri
    from flows.pipeline import align

    started, results = time.time(), {}
    if args.from_saved:  # seeds saved by --save, each with the command and commit that made it
        import json

        import quality_ifeval

        saved = [json.loads(Path(f).read_text()) for f in args.from_saved]
        rows = sorted((r for s in saved for r in s["rows"]), key=lambda r: r["seed"])
        out = quality_ifeval.section(rows, "`; `".join(sorted({s["command"] for s in saved})),
                                     "; ".join(sorted({s["machine"] for s in saved})), sum(r["wall_s"] for r in rows))
        return write_section(Path(args.out), out, quality_ifeval.BEGIN, quality_ifeval.END)
    if args.from_runs:
        for item in args.from_runs:
            config, run_id = item.rsplit("=", 1)
            run = MlflowClient().get_run(run_id)
            results.setdefault(config, []).append({
                "seed": int(run.data.params["seed"]), "run_id": run_id,
                "wall_s": (run.info.end_time - run.info.start_time) / 1000, **run.data.metrics,
                **stage_watch(MlflowClient(), run)})
        args.configs, args.seeds = list(results), [r["seed"] for r in next(iter(results.values()))]
        wall = sum(r["wall_s"] for rows in results.values() for r in rows)
    else:
        for path in args.configs:
            for seed in args.seeds:
                config = load_config(path, [f"experiment={args.experiment}", *args.overrides, f"seed={seed}"])
                t0 = time.time()
                flow = align(config)
                run = MlflowClient().get_run(flow["parent_run_id"])
                results.setdefault(path, []).append({"seed": seed, "run_id": run.info.run_id,
                                                     "wall_s": time.time() - t0, **run.data.metrics,
                                                     **stage_watch(MlflowClient(), run)})
        wall = time.time() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    command = "python bench/quality.py " + ("--ifeval " if args.ifeval else "") + " ".join(
        [f"--configs {' '.join(os.path.relpath(c, ROOT) for c in args.configs)}",
         f"--seeds {' '.join(map(str, args.seeds))}"] + [shlex.quote(o) for o in args.overrides])
    names = [Path(c).name for c in args.configs]
    groups = list(results.values())
    if args.ifeval:
        import quality_ifeval

        client = MlflowClient()
        for row in groups[0]:
            run = client.get_run(row["run_id"])
            row |= {"prompts": quality_ifeval.per_prompt(client, run), "promotion": quality_ifeval.promotion(run),
                    "stages": quality_ifeval.stage_minutes(client, run)}
        if args.save:
            import json

            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            Path(args.save).write_text(json.dumps({"command": command + f" (git {commit})", "machine": machine(),
                                                   "rows": groups[0]}, indent=1) + "\n")
        out = quality_ifeval.section(groups[0], command + f" (git {commit})", machine(), wall)
        return write_section(Path(args.out), out, quality_ifeval.BEGIN, quality_ifeval.END)
    out = [BEGIN, f"## Quality benchmark: {', '.join(names)}; seeds {args.seeds}", "",
           f"- command: `{command}` (git {commit}, tracking `{tracking_uri()}`, experiment `{args.experiment}`)",
           f"- machine: {machine()}",
           f"- wall time: {wall / 60:.1f} min for {sum(len(g) for g in groups)} flow runs, one after another",
           f"- held-out eval: {int(sum(1 for k in groups[0][0] if k.startswith('sft.accuracy.')))} task types, greedy "
           "decoding, exact match; [a, b] = 95% bootstrap interval over eval prompts; pass@8 = any of 8 samples at "
           "temperature 1 correct; a wrong answer is a wrong value, verbose (the right value, then rambling) or "
           "run-on (the right value repeated, no end of turn)",
           "", f"### Goal ({names[0]}" + (f", against {names[1]}'s SFT" if len(names) > 1 else "") + ")", "",
           *goal_lines(groups[0], groups[1] if len(groups) > 1 else None)]
    for name, rows in zip(names, groups):
        out += ["", *config_section(name, rows), *watch_lines(name, rows)]
    out.append(END)
    return write_section(Path(args.out), out, BEGIN, END)


def write_section(path: Path, out: list[str], begin: str, end: str) -> int:
    """Replace the part between the markers (or append it, or write the file): the hand-written reading
    around the generated part stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(out) + "\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        text = old[: old.index(begin)] + text.rstrip("\n") + old[old.index(end) + len(end):]
    elif old:
        text = old.rstrip("\n") + "\n\n" + text
    path.write_text(text)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
