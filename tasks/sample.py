"""Stage 3: N candidate responses per prompt from the SFT model, batched across prompts."""

from __future__ import annotations

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow.caching import stage_dir
from alignflow.config import SampleSection
from alignflow.data import read_jsonl, write_jsonl
from alignflow.modeling import check_template, generate, load_causal_lm, load_tokenizer
from alignflow.refs import DatasetRef, ModelRef, digest_path
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, record_output, stage_run
from tasks import stage_logger


def sample_candidates(cfg: SampleSection, policy_path: str, rows: list[dict], device: str, seed: int,
                      tokenizer=None) -> list[dict]:
    tokenizer = tokenizer or load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, device)
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], num_return_sequences=cfg.num_candidates,
                       do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed, progress="sample")
    return [{"prompt": r["prompt"], "reference": r["completion"][0]["content"] if r["completion"] else None,
             "task": r["task"], "candidates": [o["text"] for o in outs], "ended": [o["ended"] for o in outs]}
            for r, outs in zip(rows, outputs)]


@task(name="sample", cache_policy=NONE)
def sample(cfg: SampleSection, policy: ModelRef, prompts: DatasetRef, ctx: RunContext, name: str = "sample",
           seed_offset: int = 0, cache_key: str | None = None) -> DatasetRef:
    with stage_run(ctx, name, flatten({**cfg.model_dump(exclude={"prompts"}), "policy": policy.uri}, "sample"),
                   cache_key) as run_id:
        rows = read_jsonl(prompts.resolve())
        log_dataset(rows, source=prompts.uri, name="prompts", context="sampling")
        policy_path = policy.resolve()
        tokenizer = load_tokenizer(policy_path)
        template = check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
        candidates = sample_candidates(cfg, policy_path, rows, ctx.device, ctx.seed + seed_offset, tokenizer)
        out = write_jsonl(candidates, stage_dir(ctx, name, cache_key) / "candidates.jsonl")
        mlflow.log_artifact(str(out))
        mlflow.log_table({"prompt": [r["prompt"][-1]["content"] for r in candidates for _ in r["candidates"]],
                          "candidate": [c for r in candidates for c in r["candidates"]],
                          "ended": [e for r in candidates for e in r["ended"]]}, "candidates_table.json")
        ended = [e for row in candidates for e in row["ended"]]
        lengths = [len(c.split()) for row in candidates for c in row["candidates"]]
        log_metrics(run_id, {"candidates": len(ended), "eos_rate": sum(ended) / len(ended),
                             "mean_words": sum(lengths) / len(lengths)})
        stage_logger().info("sampled %d candidates for %d prompts", len(ended), len(rows))
        ref = DatasetRef(uri=f"runs:/{run_id}/{out.name}", digest=digest_path(out), run_id=run_id,
                         local_path=str(out), chat_template=template)
        record_output(ref)
        return ref
