"""One module per stage; each stage is a Prefect task that takes and returns references, and declares
itself (config, inputs, cache pins) with `alignflow.stages.register` in its own module."""

import logging
from pathlib import Path

import mlflow

from alignflow.modeling import template_fingerprint
from alignflow.refs import DatasetRef, ModelRef, digest_path
from alignflow.tracking import record_output


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow (shown in the Prefect UI); a plain logger when a stage
    function is called directly (tests, notebooks)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("alignflow")


def preference_inputs(policy: ModelRef, pairs: DatasetRef, name: str) -> tuple[str, str, object]:
    """What every preference stage does before its model loads (dpo, dpo_no_sft, rft): read and log the
    pairs, load the policy's tokenizer and check that policy and pairs share its chat template.
    Returns (local path of the pairs, local policy path, tokenizer)."""
    from alignflow.data import read_jsonl
    from alignflow.modeling import check_template, load_tokenizer
    from alignflow.tracking import log_dataset

    rows_path = str(pairs.resolve())
    log_dataset(read_jsonl(rows_path), source=pairs.uri, name="pairs", context="training")
    policy_path = policy.resolve()
    tokenizer = load_tokenizer(policy_path, policy.trust_remote_code)
    check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
    check_template(tokenizer, pairs.chat_template, name, f"the sampling of pairs {pairs.uri}")
    return rows_path, policy_path, tokenizer


def train_and_save(job, launch, tokenizer, source: ModelRef) -> ModelRef:
    """Train as `job` says, in this process or launched (alignflow.launch), then log the saved model (weights
    or adapter, safetensors, with its tokenizer and chat template) to the stage's run and return its
    ModelRef, which keeps the `trust_remote_code` of the `source` model it was trained from.

    `job.merge_adapter`: a LoRA adapter is merged into the model it was trained on and saved as full
    weights. The preference stages need it: their starting policy may itself be a LoRA SFT merged
    into its base at load time, and an adapter saved alone would name that base, not base + SFT, as
    the model beneath it (a LoRA DPO on a LoRA SFT reloaded as base + DPO and lost the SFT)."""
    from alignflow.launch import run_training
    from tasks.transfer import call, upload_artifacts

    run_training(job, launch, stage_logger())
    if job.lora and job.merge_adapter:
        mlflow.set_tag("alignflow.lora_merged", "true")
    model_dir = Path(job.model_dir)
    uri = call(upload_artifacts, str(model_dir), "model", job.run_id)  # retried on transient failures
    ref = ModelRef(uri=uri, digest=digest_path(model_dir), run_id=job.run_id, local_path=str(model_dir),
                   chat_template=template_fingerprint(tokenizer), trust_remote_code=source.trust_remote_code)
    record_output(ref)
    return ref
