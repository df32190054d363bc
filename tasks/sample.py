"""Stage 3: N candidate responses per prompt from the SFT model, through the configured generation
engine (alignflow.engines; transformers by default, one prefill shared by a prompt's samples)."""

from __future__ import annotations

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import SampleSection
from alignflow.data.instructions import reference_of
from alignflow.data.records import read_jsonl, write_jsonl
from alignflow.engines.base import Sampling
from alignflow.models.loading import load_tokenizer
from alignflow.models.templates import check_template
from alignflow.refs import DatasetRef, ModelRef, digest_path
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, record_output, stage_run
from tasks import stage_logger
from tasks.caching import stage_dir
from tasks.stages import Stage, register


def sample_candidates(cfg: SampleSection, policy_path: str, rows: list[dict], device: str, seed: int,
                      tokenizer=None, trust_remote_code: bool = False) -> list[dict]:
    generator = cfg.engine.open(policy_path, device, tokenizer, trust_remote_code)
    outputs = generator.generate([r["prompt"] for r in rows], n=cfg.num_candidates,
                                 sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p),
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed,
                                 progress="sample")
    generator.close()
    return [{"prompt": r["prompt"], "reference": reference_of(r),
             "task": r["task"], "candidates": [o["text"] for o in outs], "ended": [o["ended"] for o in outs]}
            for r, outs in zip(rows, outputs)]


@task(name="sample", cache_policy=NONE)
def sample(cfg: SampleSection, policy: ModelRef, prompts: DatasetRef, ctx: RunContext, name: str = "sample",
           seed_offset: int = 0, cache_key: str | None = None) -> DatasetRef:
    params = flatten({**cfg.model_dump(mode="json", exclude={"prompts"}), "policy": policy.uri}, "sample")
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows = read_jsonl(prompts.resolve())
        log_dataset(rows, source=prompts.uri, name="prompts", context="sampling")
        policy_path = policy.resolve()
        tokenizer = load_tokenizer(policy_path, policy.trust_remote_code)
        template = check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
        candidates = sample_candidates(cfg, policy_path, rows, ctx.device, ctx.seed + seed_offset, tokenizer,
                                       policy.trust_remote_code)
        out = write_jsonl(candidates, stage_dir(ctx, name, cache_key) / "candidates.jsonl")
        mlflow.log_artifact(str(out))
        mlflow.log_table({"prompt": [r["prompt"][-1]["content"] for r in candidates for _ in r["candidates"]],
                          "candidate": [c for r in candidates for c in r["candidates"]],
                          "ended": [e for r in candidates for e in r["ended"]]}, "candidates_table.json")
        ended = [e for row in candidates for e in row["ended"]]
        lengths = [len(c.split()) for row in candidates for c in row["candidates"]]
        distinct = sum(len(set(row["candidates"])) for row in candidates) / len(candidates)
        log_metrics(run_id, {"candidates": len(ended), "eos_rate": sum(ended) / len(ended),
                             "mean_words": sum(lengths) / len(lengths), "distinct_per_prompt": distinct})
        stage_logger().info("sampled %d candidates for %d prompts (%.2f distinct per prompt)", len(ended), len(rows),
                            distinct)
        ref = DatasetRef(uri=f"runs:/{run_id}/{out.name}", digest=digest_path(out), run_id=run_id,
                         local_path=str(out), chat_template=template)
        record_output(ref)
        return ref


register(Stage(name="sample", task=sample, config={"cfg": "sample"},
               inputs={"policy": "sft", "prompts": "load_data.prompts"}, enabled=lambda config: config.dpo.on_policy(),
               describe="candidate answers from the SFT model"))
