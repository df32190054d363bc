"""Stage 4: score every candidate with the configured ranker (alignflow.rankers), keep one pair per
prompt by the configured pair strategy (alignflow.rankers.pairs), drop ties."""

from __future__ import annotations

import hashlib

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow.components import Scorer
from alignflow.config import RankSection
from alignflow.data.records import read_jsonl, write_jsonl
from alignflow.rankers.pairs import build_pairs
from alignflow.refs import DatasetRef, digest_path
from alignflow.stats import agreement
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, record_output, stage_run
from tasks import stage_logger
from tasks.caching import stage_dir
from tasks.stages import Stage, register
from tasks.transfer import local_model


def score_rows(scorer: Scorer, rows: list[dict]) -> list[list[float]]:
    """Per prompt, one score per candidate (a pairwise judge's: its win rate among them)."""
    return scorer.score_groups([r["prompt"] for r in rows], [r["candidates"] for r in rows],
                               [r["reference"] for r in rows])


def agreements(cfg: RankSection, rows: list[dict], rewards: list[list[float]], device: str) -> dict[str, float]:
    """How the ranker's order of each prompt's candidates agrees with each ranker of `rank.agree_with`
    (pairwise agreement and Cohen's kappa, alignflow.stats.agreement): skipped, and said, for one that
    needs reference answers the prompts lack."""
    metrics = {}
    for other in cfg.agree_with:
        if other == cfg.ranker:
            continue
        if other.needs_reference and any(not isinstance(r["reference"], str) for r in rows):
            stage_logger().info("agreement with %s skipped: not every prompt has a reference answer", other.type)
            continue
        if other.needs_constraints and any(not isinstance(r["reference"], list) for r in rows):
            stage_logger().info("agreement with %s skipped: not every prompt has constraints", other.type)
            continue
        scorer = other.open(device, fetch=local_model)
        found = agreement(rewards, score_rows(scorer, rows))
        scorer.close()
        metrics |= {f"agreement.{other.type}": found["agreement"], f"kappa.{other.type}": found["kappa"]}
        stage_logger().info("%s agrees with %s on %.1f%% of candidate pairs (Cohen's kappa %.3f)", cfg.ranker.type,
                            other.type, 100 * found["agreement"], found["kappa"])
    return metrics


@task(name="rank", cache_policy=NONE)
def rank(cfg: RankSection, candidates: DatasetRef, ctx: RunContext, name: str = "rank",
         own: DatasetRef | None = None, cache_key: str | None = None) -> DatasetRef:
    """`own`: the user's preference pairs (dpo.data with dpo.mix), added after the ranked ones."""
    with stage_run(ctx, name, flatten(cfg, "rank"), cache_key) as run_id:
        rows = read_jsonl(candidates.resolve())
        log_dataset(rows, source=candidates.uri, name="candidates", context="ranking")
        scorer = cfg.ranker.open(ctx.device, fetch=local_model)
        # what a scorer keeps across attempts (the human ranker's exports and partial labels) lives where a
        # rerun on the same candidates finds it, even when the stage itself is never cached
        scorer.keep_files_in(stage_dir(ctx, name, cache_key or hashlib.sha256(candidates.digest.encode()).hexdigest()))
        rewards = score_rows(scorer, rows)
        scorer.close()
        log_metrics(run_id, scorer.stats() | agreements(cfg, rows, rewards, ctx.device))
        pairs, ties = build_pairs(rows, rewards, cfg.min_margin, cfg.pairs, ctx.seed)
        if not pairs:
            hint = "; the judge's orders disagreed (position bias): see judge.consistency_rate" \
                if scorer.stats().get("judge.consistency_rate", 1) < 0.5 else ""
            raise ValueError(f"ranking left no preference pairs: all {len(rows)} prompts were ties "
                             f"(rank.min_margin={cfg.min_margin}); sample more or more varied candidates{hint}")
        sampled = len(pairs)
        if own is not None:
            pairs += read_jsonl(own.resolve())
            log_metrics(run_id, {"sampled_pairs": sampled, "data_pairs": len(pairs) - sampled})
            stage_logger().info("%d on-policy pairs mixed with %d of dpo.data", sampled, len(pairs) - sampled)
        out = write_jsonl(pairs, stage_dir(ctx, name, cache_key) / "pairs.jsonl")
        mlflow.log_artifact(str(out))
        mlflow.log_table({"prompt": [p["prompt"][-1]["content"] for p in pairs],
                          "chosen": [p["chosen"][0]["content"] for p in pairs],
                          "rejected": [p["rejected"][0]["content"] for p in pairs],
                          "margin": [p["margin"] for p in pairs], "task": [p["task"] for p in pairs],
                          "source": [p.get("source", "ranked") for p in pairs]}, "pairs_table.json")
        all_rewards = [x for r in rewards for x in r]
        ranked = pairs[:sampled]  # the margins and rewards are the ranker's
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        words = lambda side: mean([len(p[side][0]["content"].split()) for p in pairs])  # noqa: E731
        log_metrics(run_id, {"pairs": len(pairs), "ties": ties, "tie_rate": ties / len(rows),
                             "mean_margin": mean([p["margin"] for p in ranked]),
                             "chosen_mean_words": words("chosen"), "rejected_mean_words": words("rejected"),
                             "chosen_mean_reward": mean([p["chosen_reward"] for p in ranked]),
                             "rejected_mean_reward": mean([p["rejected_reward"] for p in ranked]),
                             "mean_candidate_reward": mean(all_rewards)})
        stage_logger().info("%d pairs from %d prompts (%d ties)", len(pairs), len(rows), ties)
        ref = DatasetRef(uri=f"runs:/{run_id}/{out.name}", digest=digest_path(out), run_id=run_id,
                         local_path=str(out), chat_template=candidates.chat_template)
        record_output(ref)
        return ref


register(Stage(name="rank", task=rank, config={"cfg": "rank"},
               inputs={"candidates": "sample", "own": "load_data.preference"}, optional=("own",),
               enabled=lambda config: config.dpo.on_policy(), describe="candidates scored into preference pairs"))
