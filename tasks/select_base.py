"""Stage 1: choose the base model: each candidate is checked against a memory budget, then scored
by its loss on held-out SFT rows; the lowest loss within budget wins, and the table is logged.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import torch
from prefect import task
from prefect.cache_policies import NONE

from alignflow import embedded
from alignflow.config import BaseSection, EmbeddedSpec, LoraSection
from alignflow.data import read_jsonl
from alignflow.modeling import load_causal_lm, load_tokenizer
from alignflow.refs import DatasetRef, ModelRef, digest_path
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, record_output, stage_run
from tasks import stage_logger
from tasks.transfer import CODE_FILES, WEIGHT_FILES, call, hub_snapshot


def training_memory_gb(n_params: int, lora: bool, device: str) -> float:
    """Weights + grads + AdamW states: 16 B/param full fine-tune in fp32; LoRA trains ~1% of them."""
    weight_bytes = 2 if device == "cuda" else 4
    per_param = weight_bytes + (0.16 if lora else 12 + weight_bytes)
    return n_params * per_param / 1e9


def count_params_from_config(path: str, trust_remote_code: bool, revision: str | None) -> int:
    """Parameter count without allocating weights (accelerate's empty init), so a 70B candidate
    can be ruled out by the budget without loading it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def text_loss(model, tokenizer, rows: list[dict], batch_size: int = 16) -> float:
    """Mean per-token cross-entropy of the SFT rows as plain text (prompt, then answer).

    Plain text, not the chat template: a base model has never seen the template's markers, so
    their cost would swamp what we want to compare, how well each candidate already knows the data.
    """
    texts = ["\n\n".join(m["content"] for m in row["prompt"] + row["completion"]) for row in rows]
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(**batch, labels=labels).loss) * n
        count += n
    return total / max(count, 1)


@task(name="select_base", cache_policy=NONE)
def select_base(cfg: BaseSection, data: DatasetRef, spec: EmbeddedSpec, lora: LoraSection,
                ctx: RunContext, cache_key: str | None = None) -> ModelRef:
    logger = stage_logger()
    with stage_run(ctx, "select_base", flatten(cfg, "base"), cache_key):
        rows = read_jsonl(data.resolve())[: cfg.score_examples]
        log_dataset(rows, source=data.uri, name="sft_scoring", context="scoring")
        table = []
        for name in cfg.candidates:
            path = embedded.resolve(spec, name, "model")
            hub = not Path(path).exists()
            if hub:  # a hub id: its config first (the budget check), the weights only if it fits
                path = call(hub_snapshot, name, cfg.revision, ["*.json"])
            n_params = count_params_from_config(path, cfg.trust_remote_code, cfg.revision)
            memory = training_memory_gb(n_params, lora.enabled, ctx.device)
            entry = {"candidate": name, "path": path, "params": n_params, "train_memory_gb": round(memory, 4),
                     "within_budget": memory <= cfg.memory_budget_gb, "text_loss": math.nan, "commit": ""}
            if entry["within_budget"]:
                if hub:
                    patterns = WEIGHT_FILES + (CODE_FILES if cfg.trust_remote_code else [])
                    path = entry["path"] = call(hub_snapshot, name, cfg.revision, patterns)
                tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.revision)
                model = load_causal_lm(path, ctx.device, trust_remote_code=cfg.trust_remote_code,
                                       revision=cfg.revision)
                entry["text_loss"] = text_loss(model, tokenizer, rows)
                entry["commit"] = getattr(model.config, "_commit_hash", None) or ""
                del model
            logger.info("candidate %s: %s params, %.3f GB to train, text loss %.4f", name, f"{n_params:,}",
                        memory, entry["text_loss"])
            table.append(entry)
        eligible = [e for e in table if e["within_budget"]]
        if not eligible:
            raise ValueError(f"no base candidate fits base.memory_budget_gb={cfg.memory_budget_gb}: "
                             + ", ".join(f"{e['candidate']} needs {e['train_memory_gb']} GB" for e in table))
        chosen = min(eligible, key=lambda e: e["text_loss"])
        for e in table:
            e["chosen"] = e is chosen
        mlflow.log_table({k: [e[k] for e in table] for k in table[0]}, "candidates.json")
        mlflow.set_tag("alignflow.base_model", chosen["candidate"])
        log_metrics(mlflow.active_run().info.run_id,
                    {"chosen.text_loss": chosen["text_loss"], "chosen.params": chosen["params"]})
        logger.info("chose %s (text loss %.4f)", chosen["candidate"], chosen["text_loss"])
        # a hub model keeps its hub id as URI (other machines fetch it) and its downloaded copy as local path
        hub = chosen["path"] != embedded.resolve(spec, chosen["candidate"], "model")
        ref = ModelRef(uri=chosen["candidate"] if hub else chosen["path"], local_path=chosen["path"],
                       digest=digest_path(chosen["path"]), run_id=mlflow.active_run().info.run_id)
        record_output(ref)
        return ref
