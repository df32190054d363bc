"""How well an LLM judge ranks the embedded suite's candidates: its agreement with the verifier (which
knows the answers), its consistency across the two orders of each pair and its position bias.

    python bench/judge.py --from-run PARENT_RUN_ID                       # a finished flow run's sampled candidates
    python bench/judge.py --from-run ID --judges embedded:smollm2-135m --prompts 100 --max-pairs 2

The candidates are the ones the run's sample stage logged (`candidates.jsonl`), so the judge sees what
the rank stage would give it; each judge ranks them as `rank.ranker: {type: judge, model: ...}` would,
and the table (agreement and Cohen's kappa over candidate pairs, consistency, first-position rate, judge
calls, seconds) replaces the part of docs/results.md between `<!-- judge:begin -->` and `<!-- judge:end -->`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- judge:begin -->", "<!-- judge:end -->"


def candidates(run_id: str, tmp: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from alignflow.data.records import read_jsonl

    client = MlflowClient()
    parent = client.get_run(run_id)
    sample = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                "attributes.run_name = 'sample'", max_results=1)
    if not sample:
        raise SystemExit(f"run {run_id} has no sample stage")
    return read_jsonl(client.download_artifacts(sample[0].info.run_id, "candidates.jsonl", tmp))


def main() -> int:
    import tempfile

    from alignflow.rankers.judge import Judge
    from alignflow.rankers.verifier import Verifier
    from alignflow.stats import agreement
    from bench.quality import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", required=True, help="MLflow parent run id of a finished flow run")
    parser.add_argument("--judges", nargs="+", default=["embedded:smollm2-135m"], help="local judge models")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-pairs", type=int, default=2, help="candidate pairs judged per prompt")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = candidates(args.from_run, tmp)[: args.prompts]
    prompts, cands, refs = ([r[k] for r in rows] for k in ("prompt", "candidates", "reference"))
    truth = Verifier().score_groups(prompts, cands, refs)
    table = []
    for name in args.judges:
        start = time.monotonic()
        judge = Judge(model=name, max_pairs=args.max_pairs).open("cpu")
        scores = judge.score_groups(prompts, cands, refs)
        seconds = time.monotonic() - start
        stats, found = judge.stats(), agreement(scores, truth)
        table.append(f"| `{name}` | {found['agreement']:.3f} | {found['kappa']:.3f} | "
                     f"{stats.get('judge.consistency_rate', float('nan')):.3f} | "
                     f"{stats.get('judge.first_position_rate', float('nan')):.3f} | "
                     f"{int(stats.get('judge.calls', 0))} | {seconds:.0f} |")
        print(table[-1], flush=True)
    command = "python bench/judge.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = [BEGIN, f"### LLM judge against the verifier ({len(rows)} prompts of run `{args.from_run[:12]}`, "
           f"{args.max_pairs} candidate pairs each, both orders)", "",
           "| judge | agreement with verifier | Cohen's kappa | consistency (both orders agree) | "
           "first-position win rate | judge calls | seconds |", "|---|---|---|---|---|---|---|", *table, "",
           f"Made by `{command}` on {machine()}.", END]
    path = Path(args.out)
    old = path.read_text() if path.exists() else ""
    text = "\n".join(out) + "\n"
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    elif old:
        text = old.rstrip("\n") + "\n\n" + text
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
