"""Stage 1: choose the base model: each candidate is checked against a memory budget, then scored
on held-out SFT rows by bits per byte of the answers given the prompts in its own chat template (a
measure that does not depend on the tokenizer); the lowest within budget wins, and the table is logged.

Candidates: `embedded:<name>`, a local model directory, a `.gguf` file (converted once to safetensors,
alignflow.models.gguf), or a hub id.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import torch
from prefect import task
from prefect.cache_policies import NONE

from alignflow import embedded, files
from alignflow.config import BaseSection, EmbeddedSpec, LoraSection
from alignflow.data.records import read_jsonl
from alignflow.models.loading import load_causal_lm, load_tokenizer, pickle_only, unpickle_to_safetensors
from alignflow.models.templates import template_fingerprint
from alignflow.refs import DatasetRef, ModelRef, digest_path
from alignflow.tracking import RunContext, flatten, log_dataset, log_metrics, record_output, stage_run
from tasks import stage_logger
from tasks.stages import Stage, register
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
    model.tie_weights()  # not done on empty weights: a tied LM head would count twice
    return sum(p.numel() for p in model.parameters())


MEASURE = "answer_bits_per_byte"  # the selection measure's name, logged with the table


@torch.inference_mode()
def answer_bits_per_byte(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Bits per UTF-8 byte of the reference answers, each given its prompt in the candidate's own chat
    template: -sum log2 p(answer tokens | prompt) / bytes of answer text.

    Comparable across tokenizers, unlike a mean per-token loss (a tokenizer that splits text finer has
    more, easier tokens and scores lower for the same model). The answer is tokenized on its own after
    the rendered prompt, so its tokens cover exactly its bytes; the template's closing markers are left
    out, since they differ between templates and say nothing about knowing the data.
    """
    import math

    sequences = []
    for row in rows:
        rendered = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        answer = row["completion"][0]["content"]
        sequences.append((prompt_ids, tokenizer(answer, add_special_tokens=False)["input_ids"],
                          len(answer.encode("utf-8"))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nats, n_bytes = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(p) + len(a) for p, a, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (prompt_ids, answer_ids, size) in enumerate(batch):  # right-padded
            n = len(prompt_ids) + len(answer_ids)
            ids[i, :n] = torch.tensor(prompt_ids + answer_ids)
            labels[i, len(prompt_ids):n] = torch.tensor(answer_ids)
            mask[i, :n] = 1
            n_bytes += size
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        nats += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(
            logits.device), ignore_index=-100, reduction="sum"))
    return nats / max(n_bytes, 1) / math.log(2)


class NoUsableCandidate(ValueError):
    """No base candidate can be trained: each was unreachable or over the memory budget (the message
    has one line per candidate saying which)."""


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a model source that cannot be reached raises: the hub offline or an unknown id (huggingface_hub's
    errors are OSErrors), a missing directory or file, a GGUF file gguf cannot read (ValueError and the
    reader's struct/index errors), a directory without safetensors weights (OSError from transformers)."""
    import struct

    from alignflow.models.gguf import GGUFError

    return (OSError, ValueError, KeyError, IndexError, struct.error, GGUFError)


UNREACHABLE = unreachable_errors()


def unreachable_reason(err: BaseException) -> str:
    """One line: the error's type and the first line of its message."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}"[:300]


def _measure(entry: dict, cfg: BaseSection, spec: EmbeddedSpec, lora: LoraSection, ctx: RunContext,
             rows: list[dict]) -> None:
    """Fill in one candidate's row of the table: its size and memory need, and, within the budget, its
    score; raises one of UNREACHABLE when the model cannot be found or loaded."""
    name = entry["candidate"]
    path = embedded.resolve(spec, name, "model")
    hub = not Path(path).exists()
    if hub:  # a hub id: its config first (the budget check), the weights only if it fits
        if name.startswith(("/", "./", "../", "~")):
            raise FileNotFoundError(f"{name}: no such directory or file")
        path = call(hub_snapshot, name, cfg.revision, ["*.json"])
    elif cfg.allow_pickle_weights and pickle_only(path):
        path = str(unpickle_to_safetensors(path, files.home(), cfg.trust_remote_code))
    n_params = count_params_from_config(path, cfg.trust_remote_code, cfg.revision)
    memory = training_memory_gb(n_params, lora.enabled, ctx.device)
    entry.update({"path": path, "params": n_params, "train_memory_gb": round(memory, 4),
                  "within_budget": memory <= cfg.memory_budget_gb})
    if entry["within_budget"]:
        if hub:
            patterns = WEIGHT_FILES + (CODE_FILES if cfg.trust_remote_code else [])
            path = entry["path"] = call(hub_snapshot, name, cfg.revision, patterns)
        tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.revision)
        model = load_causal_lm(path, ctx.device, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        entry[MEASURE] = answer_bits_per_byte(model, tokenizer, rows)
        entry["chat_template"] = template_fingerprint(tokenizer)
        entry["commit"] = getattr(model.config, "_commit_hash", None) or ""
        del model


@task(name="select_base", cache_policy=NONE)
def select_base(cfg: BaseSection, data: DatasetRef, spec: EmbeddedSpec, lora: LoraSection,
                ctx: RunContext, cache_key: str | None = None) -> ModelRef:
    logger = stage_logger()
    with stage_run(ctx, "select_base", flatten(cfg, "base"), cache_key):
        rows = read_jsonl(data.resolve())[: cfg.score_examples]
        log_dataset(rows, source=data.uri, name="sft_scoring", context="scoring")
        table = []
        for name in cfg.candidates:
            entry = {"candidate": name, "path": "", "params": 0, "train_memory_gb": math.nan, "within_budget": False,
                     MEASURE: math.nan, "chat_template": "", "commit": "", "skipped": ""}
            try:
                _measure(entry, cfg, spec, lora, ctx, rows)
            except UNREACHABLE as err:  # the others still compete; the table says why this one did not
                entry["skipped"] = unreachable_reason(err)
                logger.warning("candidate %s skipped: %s", name, entry["skipped"])
            else:
                logger.info("candidate %s: %s params, %.3f GB to train, %s %.4f", name, f"{entry['params']:,}",
                            entry["train_memory_gb"], MEASURE, entry[MEASURE])
            table.append(entry)
        eligible = [e for e in table if e["within_budget"] and not e["skipped"]]
        chosen = min(eligible, key=lambda e: e[MEASURE]) if eligible else None
        for e in table:
            e["chosen"] = e is chosen
        mlflow.log_table({k: [e[k] for e in table] for k in table[0]}, "candidates.json")
        if chosen is None:  # the table is logged all the same: it says why each candidate is out
            reachable = [e for e in table if not e["skipped"]]
            raise NoUsableCandidate(
                ("no base candidate could be loaded" if not reachable else
                 f"no base candidate fits base.memory_budget_gb={cfg.memory_budget_gb}") + ":\n"
                + "\n".join(f"  {e['candidate']}: " + (f"skipped: {e['skipped']}" if e["skipped"] else
                                                       f"needs {e['train_memory_gb']} GB") for e in table))
        mlflow.set_tags({"alignflow.base_model": chosen["candidate"], "alignflow.selection_measure": MEASURE})
        log_metrics(mlflow.active_run().info.run_id,
                    {f"chosen.{MEASURE}": chosen[MEASURE], "chosen.params": chosen["params"]})
        logger.info("chose %s (%s %.4f)", chosen["candidate"], MEASURE, chosen[MEASURE])
        # a hub model keeps its hub id as URI (other machines fetch it) and its downloaded copy as local path
        hub = not Path(embedded.resolve(spec, chosen["candidate"], "model")).exists()
        ref = ModelRef(uri=chosen["candidate"] if hub else chosen["path"], local_path=chosen["path"],
                       digest=digest_path(chosen["path"]), run_id=mlflow.active_run().info.run_id,
                       chat_template=chosen["chat_template"], trust_remote_code=cfg.trust_remote_code)
        record_output(ref)
        return ref


def check(config, device: str, out_dir) -> None:
    """Every embedded name is one the spec defines, and at least one candidate may be reachable: when
    every candidate is a local file or directory that does not exist, the run stops here. One missing
    candidate among others is skipped by the stage (the selection table says why)."""
    missing = []
    for name in config.base.candidates:
        if name.startswith(embedded.PREFIX):
            embedded.check_model_name(config.embedded, name)
        elif (name.endswith(".gguf") or name.startswith(("/", "./", "../", "~"))) and not Path(name).exists():
            missing.append(name)
    if missing and len(missing) == len(config.base.candidates):
        raise ValueError("base.candidates: none can be found: " + "; ".join(f"{n}: no such file or directory"
                                                                           for n in missing))


def candidate_contents(arguments: dict) -> dict:
    """The candidates by content (a hub id only at a pinned commit), beyond their names in the config."""
    from alignflow.pins import model_source

    cfg = arguments["cfg"]
    return {"candidates": [model_source(c, cfg.revision) for c in cfg.candidates]}


register(Stage(name="select_base", task=select_base, config={"cfg": "base", "spec": "embedded", "lora": "sft.lora"},
               inputs={"data": "load_data.sft"}, pins=candidate_contents, check=check, evaluated_as="base",
               describe="choose the base model"))
