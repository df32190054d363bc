"""One module per stage; each stage is a Prefect task that takes and returns references, and declares
itself (config, inputs, cache pins) with `alignflow.stages.register` in its own module."""

import json
import logging
import os
import shutil
from pathlib import Path

import mlflow
from transformers import TrainerCallback

from alignflow.modeling import stop_token_ids, template_fingerprint
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


def preference_inputs(policy: ModelRef, pairs: DatasetRef, name: str) -> tuple[list[dict], str, object]:
    """What every preference stage does before its model loads (dpo, dpo_no_sft, rft): read and log the
    pairs, load the policy's tokenizer and check that policy and pairs share its chat template.
    Returns (pair rows, local policy path, tokenizer)."""
    from alignflow.data import read_jsonl
    from alignflow.modeling import check_template, load_tokenizer
    from alignflow.tracking import log_dataset

    rows = read_jsonl(pairs.resolve())
    log_dataset(rows, source=pairs.uri, name="pairs", context="training")
    policy_path = policy.resolve()
    tokenizer = load_tokenizer(policy_path, policy.trust_remote_code)
    check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
    check_template(tokenizer, pairs.chat_template, name, f"the sampling of pairs {pairs.uri}")
    return rows, policy_path, tokenizer


def save_trained_model(trainer, tokenizer, model_dir: Path, run_id: str, source: ModelRef, is_adapter: bool,
                       merge_adapter: bool = False) -> ModelRef:
    """Save a TRL trainer's model (weights or adapter, safetensors) with its tokenizer and chat
    template, make generation stop at end of turn, log it to the stage's run, return its ModelRef
    (which keeps the `trust_remote_code` of the `source` model it was trained from).

    `merge_adapter`: a LoRA adapter is merged into the model it was trained on and saved as full
    weights. The preference stages need it: their starting policy may itself be a LoRA SFT merged
    into its base at load time, and an adapter saved alone would name that base, not base + SFT, as
    the model beneath it (a LoRA DPO on a LoRA SFT reloaded as base + DPO and lost the SFT)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)
    if is_adapter and merge_adapter:
        model = model.merge_and_unload()
        model.save_pretrained(str(model_dir), safe_serialization=True)
        mlflow.set_tag("alignflow.lora_merged", "true")
    else:
        trainer.save_model(str(model_dir))
        (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: no saved model carries one
    tokenizer.save_pretrained(str(model_dir))
    from tasks.transfer import call, upload_artifacts

    uri = call(upload_artifacts, str(model_dir), "model", run_id)  # retried on transient failures
    ref = ModelRef(uri=uri, digest=digest_path(model_dir), run_id=run_id, local_path=str(model_dir),
                   chat_template=template_fingerprint(tokenizer), trust_remote_code=source.trust_remote_code)
    record_output(ref)
    return ref


COMPLETE_MARKER = "alignflow-complete.json"


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once transformers has written all of it (model, optimizer,
    scheduler, RNG and trainer state): the marker is written last, atomically. transformers writes a
    checkpoint's files one by one into the final directory, so a process killed mid-save leaves a
    directory that looks like a checkpoint; only marked ones are resumed from. Hand-written because
    neither transformers nor TRL marks complete checkpoints."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and args.should_save:
            tmp = folder / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps({"global_step": state.global_step}))
            os.replace(tmp, folder / COMPLETE_MARKER)


def last_complete_checkpoint(trainer_dir: str | Path) -> Path | None:
    """The highest-step checkpoint under trainer_dir that carries the completion marker."""
    best: tuple[int, Path] | None = None
    for folder in Path(trainer_dir).glob("checkpoint-*"):
        marker = folder / COMPLETE_MARKER
        try:
            step = json.loads(marker.read_text())["global_step"]
        except (OSError, ValueError, KeyError):
            continue  # half-written (killed mid-save) or not ours
        if folder.name == f"checkpoint-{step}" and (best is None or step > best[0]):
            best = (step, folder)
    return best[1] if best else None


def train_resumable(trainer, trainer_dir: str | Path, stage: str):
    """trainer.train(), resumed from the last complete checkpoint of an earlier attempt if any.

    transformers restores model, optimizer, scheduler, RNG and the data position, so the resumed
    run ends at the same global step as an uninterrupted one. Once training has finished the
    checkpoints are removed (they hold optimizer state, several times the model's size)."""
    checkpoint = last_complete_checkpoint(trainer_dir)
    if checkpoint is not None:
        stage_logger().info("%s: resuming from %s", stage, checkpoint)
        if mlflow.active_run():
            mlflow.set_tag("alignflow.resumed_from", checkpoint.name)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if mlflow.active_run():
        mlflow.log_metric("global_step", result.global_step)
    for folder in Path(trainer_dir).glob("checkpoint-*"):  # finished: the saved model replaces them
        shutil.rmtree(folder, ignore_errors=True)
    return result
