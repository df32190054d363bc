"""The stage layer: one module per stage; each stage is a Prefect task that takes and returns references, and
declares itself (config, inputs, cache pins) with `tasks.stages.register` in its own module. Beside the stages:
the stage registry (stages.py), stage cache keys and Prefect's cache policy (caching.py), the Host that gives
the core's components Prefect's services (host.py), the run report (reporting.py), artifact transfer
(transfer.py), and here what the training stages share.

Importing this package installs the PrefectHost (alignflow.host) and carries the core's logger `alignflow`
into Prefect's run logs."""

import logging
from pathlib import Path

import mlflow

from alignflow.host import install as install_host
from alignflow.models.templates import template_fingerprint
from alignflow.refs import DatasetRef, ModelRef, digest_path
from alignflow.tracking import record_output
from alignflow.training.trainers import TRAINERS
from tasks.host import PrefectHost


class _InPrefectRun(logging.Filter):
    """Pass a record to Prefect's API only inside a flow or task run (outside one it has nowhere to go)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def carry_core_logs() -> None:
    """The core logs through the standard logger `alignflow` (it imports no Prefect); inside a run its
    records go to Prefect's run log too (the UI), as `PREFECT_LOGGING_EXTRA_LOGGERS=alignflow` would do
    when set before Prefect loads. Done here so it holds whatever was imported first."""
    from prefect.logging.handlers import APILogHandler

    core = logging.getLogger("alignflow")
    if core.level == logging.NOTSET:
        core.setLevel(logging.INFO)
    if not any(isinstance(handler, APILogHandler) for handler in core.handlers):
        handler = APILogHandler()
        handler.addFilter(_InPrefectRun())
        core.addHandler(handler)


install_host(PrefectHost())
carry_core_logs()


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow (shown in the Prefect UI); a plain logger when a stage
    function is called directly (tests, notebooks)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("alignflow")


def trainer_arguments(section, trainer: str, device: str, seed: int, out_dir) -> dict:
    """A training stage's TRL config kwargs: alignflow's per-device defaults for the trainer's TRL config (its row
    in alignflow.training.trainers.TRAINERS), then the section's `trainer:` keys."""
    from alignflow.models.loading import attn_implementation
    from alignflow.training.args import trainer_args

    attn = attn_implementation(section.attn_implementation, device)
    return trainer_args(section.trainer, device, seed, out_dir, section.checkpoint_steps, TRAINERS[trainer].config,
                        attn, section.launch.mixed_precision)


def check_training(stage: str, trainer: str, args: dict, section_name: str, launch, device: str) -> None:
    """A training stage's own check, run by `validate` and `run` before any model loads: its TRL config builds
    from `args`, and its launch settings can run on this device."""
    from alignflow.training.args import build_trl_config
    from alignflow.training.run import check_launch

    build_trl_config(stage, TRAINERS[trainer].config, args)
    check_launch(section_name, launch, device)


def train_stage(ctx, name: str, section_name: str, cfg, trainer: str, args: dict, model: ModelRef, out_dir: Path,
                cache_key: str | None, inputs, params: dict, **job) -> ModelRef:
    """What a training stage (sft, dpo, rft, ...) does around its trainer: a child run whose params are the
    resolved trainer arguments, LoRA and launch settings and `params` (under `section_name`); `inputs()` reads
    and logs the data, loads the tokenizer and checks chat templates before any weights load, returning
    (rows path, model path, tokenizer); then the TrainJob (`job`: its other fields) and train_and_save."""
    from alignflow.models.loading import attn_implementation
    from alignflow.tracking import flatten, stage_run
    from alignflow.training.run import TrainJob

    attn = attn_implementation(cfg.attn_implementation, ctx.device)
    params = flatten({"trainer": args, "lora": cfg.lora.model_dump(), "launch": cfg.launch.model_dump(), **params,
                      "attn_implementation": attn}, section_name)
    with stage_run(ctx, name, params, cache_key) as run_id:
        rows_path, model_path, tokenizer = inputs()
        train_job = TrainJob(stage=name, trainer=trainer, rows=rows_path, model=model_path, device=ctx.device,
                             args=args, run_id=run_id, model_dir=str(out_dir / "model"), attn=attn,
                             trust_remote_code=model.trust_remote_code,
                             lora=cfg.lora.model_dump() if cfg.lora.enabled else None, **job)
        return train_and_save(train_job, cfg, tokenizer, model)


def instruction_inputs(base: ModelRef, data: DatasetRef, name: str) -> tuple[str, str, object]:
    """What SFT does before its model loads: read and log the rows, load the base model's tokenizer and check
    that it has the chat template the base was selected with. Returns (rows path, base path, tokenizer)."""
    from alignflow.data.records import read_jsonl
    from alignflow.models.loading import load_tokenizer
    from alignflow.models.templates import check_template
    from alignflow.tracking import log_dataset

    rows_path = str(data.resolve())
    log_dataset(read_jsonl(rows_path), source=data.uri, name=name, context="training")
    base_path = base.resolve()
    tokenizer = load_tokenizer(base_path, base.trust_remote_code)
    check_template(tokenizer, base.chat_template, name, f"base model {base.uri}")
    return rows_path, base_path, tokenizer


def preference_inputs(policy: ModelRef, pairs: DatasetRef, name: str) -> tuple[str, str, object]:
    """What every preference stage does before its model loads (dpo, dpo_no_sft, rft): read and log the
    pairs, load the policy's tokenizer and check that policy and pairs share its chat template.
    Returns (local path of the pairs, local policy path, tokenizer)."""
    from alignflow.data.records import read_jsonl
    from alignflow.models.loading import load_tokenizer
    from alignflow.models.templates import check_template
    from alignflow.tracking import log_dataset

    rows_path = str(pairs.resolve())
    log_dataset(read_jsonl(rows_path), source=pairs.uri, name="pairs", context="training")
    policy_path = policy.resolve()
    tokenizer = load_tokenizer(policy_path, policy.trust_remote_code)
    check_template(tokenizer, policy.chat_template, name, f"policy {policy.uri}")
    check_template(tokenizer, pairs.chat_template, name, f"the sampling of pairs {pairs.uri}")
    return rows_path, policy_path, tokenizer


def fit_rows(job, overlength: str, tokenizer):
    """The job with the rows it trains on fitted to the trainer's max_length (training.trainers.fit_to_length):
    over-length rows counted and logged (metrics `data.*`, one warning line), dropped ones left out of a copy
    of the rows file beside the model (the input file is never changed). Fails if no row is left."""
    import dataclasses

    import trl

    from alignflow.data.records import read_jsonl, write_jsonl
    from alignflow.tracking import log_metrics, log_params
    from alignflow.training.trainers import fit_to_length

    if not TRAINERS[job.trainer].answers:  # an online trainer (GRPO): it samples its answers as it trains
        return job
    trl_config = getattr(trl, TRAINERS[job.trainer].config)
    # a trainer without these fields (KTOConfig has no truncation_mode) truncates as TRL's default, keep_end
    max_length = job.args.get("max_length", getattr(trl_config, "max_length", None))
    truncation = job.args.get("truncation_mode", getattr(trl_config, "truncation_mode", "keep_end"))
    rows = read_jsonl(job.rows)
    kept, report = fit_to_length(rows, tokenizer, job.trainer, max_length, truncation, overlength)
    log_metrics(job.run_id, {"data.rows": report["rows"], "data.overlength_rows": report["overlength"],
                             "data.dropped_rows": report["dropped"], "data.max_tokens": report["max_tokens"]})
    log_params(job.run_id, {f"{'dpo' if job.trainer == 'rft' else job.trainer}.overlength": overlength})
    if report["overlength"]:
        stage_logger().warning(
            "%s: %d of %d rows are longer than max_length %s tokens (the longest %d; rows %s%s): %d dropped, %d "
            "truncated by TRL (%s)", job.stage, report["overlength"], report["rows"], max_length,
            report["max_tokens"], ", ".join(map(str, report["examples"])),
            ", ..." if report["overlength"] > len(report["examples"]) else "", report["dropped"],
            report["overlength"] - report["dropped"], truncation)
    if not kept:
        raise ValueError(f"{job.stage}: no row fits max_length {max_length} tokens (the longest has "
                         f"{report['max_tokens']}): raise {job.stage}.trainer.max_length or shorten the data")
    if not report["dropped"]:
        return job
    fitted = write_jsonl(kept, Path(job.model_dir).parent / "rows.fitted.jsonl")
    return dataclasses.replace(job, rows=str(fitted))


def watch_preference(job, limits, tokenizer) -> list[str]:
    """After a preference stage trained: how far the chosen and rejected answers' log-probs moved from the
    reference model's (TRL's logged `rewards/*` and `logps/*`, read back from the stage's run: the same whether
    it trained here or launched) and the length gap of its pairs (alignflow.health.preference_watch). Metrics
    `watch.*` on the stage's run; each warning in the log (Prefect's) and the run's `alignflow.warnings` tag,
    which the report shows. Returns the warnings."""
    import numpy as np
    import trl
    from mlflow.tracking import MlflowClient

    from alignflow.data.records import read_jsonl
    from alignflow.health import answer_text, preference_watch
    from alignflow.tracking import log_metrics

    client = MlflowClient()
    logged = {key: [m.value for m in sorted(client.get_metric_history(job.run_id, key), key=lambda m: m.step)]
              for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")}
    pairs = read_jsonl(job.rows)
    sample = pairs[:2000]  # the mean length in tokens needs no more
    chosen_tokens = float(np.mean([len(tokenizer(answer_text(p["chosen"]), add_special_tokens=False)["input_ids"])
                                   for p in sample])) if sample else None
    beta = job.args.get("beta", trl.DPOConfig.beta)
    metrics, warnings = preference_watch(logged, beta, pairs, chosen_tokens, limits)
    log_metrics(job.run_id, metrics)
    if warnings:
        client.set_tag(job.run_id, "alignflow.warnings", "\n".join(warnings))
        for warning in warnings:
            stage_logger().warning("%s: %s", job.stage, warning)
    return warnings


def train_and_save(job, section, tokenizer, source: ModelRef) -> ModelRef:
    """Train as `job` says, in this process or launched (alignflow.training.run), then log the saved model (weights
    or adapter, safetensors, with its tokenizer and chat template) to the stage's run and return its
    ModelRef, which keeps the `trust_remote_code` of the `source` model it was trained from. `section` is the
    stage's config section (its `launch` and `overlength`).

    `job.merge_adapter`: a LoRA adapter is merged into the model it was trained on and saved as full
    weights. The preference stages need it: their starting policy may itself be a LoRA SFT merged
    into its base at load time, and an adapter saved alone would name that base, not base + SFT, as
    the model beneath it (a LoRA DPO on a LoRA SFT reloaded as base + DPO and lost the SFT)."""
    from alignflow.training.run import run_training
    from tasks.transfer import call, upload_artifacts

    job = fit_rows(job, section.overlength, tokenizer)
    run_training(job, section.launch, stage_logger())
    if TRAINERS[job.trainer].preference:  # a preference stage: what DPO's users watch
        watch_preference(job, section.watch, tokenizer)
    if job.lora and job.merge_adapter:
        mlflow.set_tag("alignflow.lora_merged", "true")
    model_dir = Path(job.model_dir)
    uri = call(upload_artifacts, str(model_dir), "model", job.run_id)  # retried on transient failures
    ref = ModelRef(uri=uri, digest=digest_path(model_dir), run_id=job.run_id, local_path=str(model_dir),
                   chat_template=template_fingerprint(tokenizer), trust_remote_code=source.trust_remote_code)
    record_output(ref)
    return ref
