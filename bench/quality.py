"""Quality benchmark: the default flow over several seeds, judged against issue #3's goal.

    python bench/quality.py                                  # seeds 0 1 2 -> docs/results.md
    python bench/quality.py --seeds 0 --out /tmp/r.md dpo.trainer.beta=0.2   # a lever, one seed

Each seed is one full flow run (same embedded data and base models, different training and sampling
seed) logged to MLflow (experiment `alignflow-quality` unless overridden); the numbers in the
results file are read back from those runs.
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


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def goal_lines(rows: list[dict]) -> list[str]:
    """The issue's goal, checked per seed and on the mean."""
    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    sft, dpo, pk = mean("sft.accuracy"), mean("dpo.accuracy"), mean("sft.pass_at_8")
    closed = (dpo - sft) / (pk - sft) if pk > sft else float("nan")
    checks = [
        ("base ≈ 0 (mean base accuracy ≤ 0.05)", mean("base.accuracy") <= 0.05, f3(mean("base.accuracy"))),
        ("SFT ≥ 0.7 (mean; per seed)", sft >= 0.7, f"{f3(sft)}; " + ", ".join(f3(r["sft.accuracy"]) for r in rows)),
        ("DPO ≥ SFT + 0.05 (mean)", dpo >= sft + 0.05, f"{dpo - sft:+.3f}"),
        ("DPO closes ≥ 1/3 of SFT's greedy→pass@8 gap (mean)", closed >= 1 / 3, f"{closed:.2f}"),
        ("DPO ≥ SFT in every seed", all(r["dpo.accuracy"] >= r["sft.accuracy"] for r in rows),
         ", ".join(f"{r['dpo.accuracy'] - r['sft.accuracy']:+.3f}" for r in rows)),
        ("DPO beats RFT (mean)", dpo > mean("rft.accuracy"), f"{dpo - mean('rft.accuracy'):+.3f}"),
        ("DPO beats DPO without the SFT term (mean)", dpo > mean("dpo_no_sft.accuracy"),
         f"{dpo - mean('dpo_no_sft.accuracy'):+.3f}"),
    ]
    return ["| goal | met | value |", "|---|---|---|"] + [f"| {g} | {'yes' if ok else '**no**'} | {v} |"
                                                          for g, ok, v in checks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--experiment", default="alignflow-quality")
    parser.add_argument("--from-runs", nargs="+", default=None, metavar="RUN_ID",
                        help="write the results from finished parent runs instead of running the flow")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every seed (a lever to try)")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from alignflow.config import load_config
    from alignflow.tracking import tracking_uri
    from flows.pipeline import align

    started, rows = time.time(), []
    if args.from_runs:
        for run_id in args.from_runs:
            run = MlflowClient().get_run(run_id)
            rows.append({"seed": int(run.data.params["seed"]), "run_id": run_id,
                         "wall_s": (run.info.end_time - run.info.start_time) / 1000, **run.data.metrics})
        args.seeds = [r["seed"] for r in rows]
        wall = sum(r["wall_s"] for r in rows)
    else:
        for seed in args.seeds:
            config = load_config(args.config, [f"experiment={args.experiment}", *args.overrides, f"seed={seed}"])
            t0 = time.time()
            results = align(config)
            run = MlflowClient().get_run(results["parent_run_id"])
            rows.append({"seed": seed, "run_id": run.info.run_id, "wall_s": time.time() - t0, **run.data.metrics})
        wall = time.time() - started
    from alignflow.report import model_order

    models = model_order({k.split(".")[0] for k in rows[0] if k.endswith(".accuracy") and k.count(".") == 1})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    command = "python bench/quality.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}"] + [shlex.quote(o) for o in args.overrides])
    walls = ", ".join(f"{r['wall_s']:.0f} s" for r in rows)
    out = [f"# Quality benchmark: {Path(args.config).name}, seeds {args.seeds}", "",
           f"- command: `{command}` (git {commit}, tracking `{tracking_uri()}`, experiment `{args.experiment}`)",
           f"- machine: {machine()}",
           f"- wall time: {wall / 60:.1f} min for {len(rows)} flow runs ({walls})",
           f"- held-out eval: {int(sum(1 for k in rows[0] if k.startswith('sft.accuracy.')))} task types, greedy decoding; "
           "[a, b] = 95% bootstrap interval over eval prompts; pass@8 = any of 8 samples at temperature 1 correct",
           "- what each lever did, and how the suite was chosen: [levers.md](levers.md); answers are balanced "
           "within each task type, so a model that only learned the answer prior scores 1/2 (yes/no, "
           "first/second, even/odd, 1/2 letters), 1/3 (3–5 vowels) or 1/8 (2–9 words)",
           "", "## Goal", "", *goal_lines(rows), "", "## Greedy accuracy per seed", "",
           "| seed | " + " | ".join(models) + " | SFT pass@8 | DPO win rate vs SFT | DPO − SFT [95% CI] | MLflow run |",
           "|" + "---|" * (len(models) + 5)]
    for r in rows:
        cells = [f"{f3(r[f'{m}.accuracy'])} [{f3(r[f'{m}.accuracy_ci95_low'])}, {f3(r[f'{m}.accuracy_ci95_high'])}]"
                 for m in models]
        out.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {f3(r['sft.pass_at_8'])} | "
                   f"{f3(r['dpo.win_rate_vs_sft'])} | {r['dpo.delta_vs_sft']:+.3f} [{f3(r['dpo.delta_vs_sft_ci95_low'])}, "
                   f"{f3(r['dpo.delta_vs_sft_ci95_high'])}] | `{r['run_id'][:12]}` |")
    mean = {m: sum(r[f"{m}.accuracy"] for r in rows) / len(rows) for m in models}
    out.append("| mean | " + " | ".join(f3(mean[m]) for m in models) + " | "
               f"{f3(sum(r['sft.pass_at_8'] for r in rows) / len(rows))} | "
               f"{f3(sum(r['dpo.win_rate_vs_sft'] for r in rows) / len(rows))} | | |")
    tasks = sorted(k.split(".", 2)[2] for k in rows[0] if k.startswith("sft.accuracy."))
    out += ["", "## Per task type (mean over seeds): greedy / pass@8", "",
            "| task | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    for t in tasks:
        out.append(f"| {t} | " + " | ".join(
            f"{f3(sum(r[f'{m}.accuracy.{t}'] for r in rows) / len(rows))} / "
            f"{f3(sum(r[f'{m}.pass_at_8.{t}'] for r in rows) / len(rows))}" for m in models) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
