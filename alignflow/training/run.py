"""Running a training stage's trainer: in the stage's own process, or as several processes under
`accelerate launch` (DDP, FSDP, DeepSpeed: whatever its config file says), one per device.

    alignflow run configs/default.yaml sft.launch.num_processes=2            # DDP on 2 devices (or 2 CPU ranks)
    alignflow run configs/default.yaml sft.launch.config_file=infra/accelerate/fsdp2.yaml

Both ways run the same `train(job)`: load the tokenizer and model, build the TRL trainer
(alignflow.training.trainers), train (resumed from the last complete checkpoint of an earlier attempt), save the
model. A launched stage writes its `TrainJob` to `<stage dir>/launch/job.json` and runs

    python -m accelerate.commands.launch [--config_file F] [--num_processes N] ... -m alignflow.training.run job.json

in a subprocess whose output streams into the stage's log (Prefect's). Only the main process logs to
MLflow (TRL's metrics, what ran, the resumed checkpoint); the stage's own process logs the params and
uploads the saved model. A rank that fails writes its error to `launch/errors/`, and the stage fails
with that rank's error; the model is saved to `model.partial/` and only renamed to `model/` once every
rank has finished, so a failed launch leaves no model that looks complete.

On a machine without CUDA the ranks run on CPU (gloo): accelerate's own CPU launcher starts a single
process unless given an MPI hostfile, so alignflow launches with `--multi_gpu` and `ACCELERATE_USE_CPU=1`
(then accelerate sets up MULTI_CPU on gloo), one OpenMP thread share per rank and gloo on loopback.
Without the CPU flag each rank would silently train alone.

Hand-written: the checkpoint marker (neither transformers nor TRL marks complete checkpoints) and the
launcher's process handling (streamed logs, rank errors, bounded teardown); accelerate does the launching.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alignflow.procs import die_with_parent, stop_group, stream_output, torchrun_root_cause


def active_paths(trainer, model) -> dict[str, Any]:
    """What actually ran, read from the trainer and model rather than from the config: attention kernel,
    precision, padding-free batching, Liger kernels, torch.compile."""
    args = trainer.args
    return {"attn_implementation": getattr(model.config, "_attn_implementation", None),
            "bf16": bool(args.bf16), "fp16": bool(args.fp16),
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "use_liger_kernel": bool(getattr(args, "use_liger_kernel", False)),
            "torch_compile": bool(args.torch_compile), "dtype": str(next(model.parameters()).dtype)}


COMPLETE_MARKER = "alignflow-complete.json"


CPU_LAUNCHABLE = ("NO", "MULTI_GPU", "MULTI_CPU")  # accelerate configs a CPU launch can honour (DDP)


_log = logging.getLogger("alignflow")


class LaunchError(RuntimeError):
    """A launched training stage failed; the message names the rank and its error."""


@dataclass(frozen=True)
class TrainJob:
    """Everything a training process needs, as plain JSON (it crosses into launched processes)."""

    stage: str            # the stage's name: sft, dpo, dpo_no_sft, rft, grpo
    trainer: str          # a row of alignflow.training.trainers.TRAINERS: sft | rft | dpo | grpo
    rows: str             # JSONL file of the training rows
    model: str            # local directory of the model to train
    device: str
    args: dict[str, Any]  # the TRL config's arguments, resolved
    run_id: str           # the stage's MLflow run (the main process logs TRL's metrics into it)
    model_dir: str        # where the trained model is saved
    attn: str | None = None
    trust_remote_code: bool = False
    lora: dict[str, Any] | None = None  # alignflow.config.LoraSection's fields when LoRA is on
    ref_copy: bool = False              # DPO: a second copy of the policy as the reference
    merge_adapter: bool = False         # save a LoRA adapter merged into the model it was trained on
    options: dict[str, Any] | None = None  # the trainer's own build arguments (GRPO: its rewards), as JSON


# --- checkpoints -----------------------------------------------------------------------------------------

class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once transformers has written all of it (model, optimizer,
    scheduler, RNG and trainer state): the marker is written last, atomically. transformers writes a
    checkpoint's files one by one into the final directory, so a process killed mid-save leaves a
    directory that looks like a checkpoint; only marked ones are resumed from."""

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


# --- one training process (the stage's own, or each launched rank) ----------------------------------------

def build_trainer(job: TrainJob, tokenizer, callbacks: list):
    from alignflow.config import LoraSection
    from alignflow.data.records import read_jsonl
    from alignflow.models.loading import load_causal_lm
    from alignflow.training.args import lora_config
    from alignflow.training.trainers import TRAINERS

    rows = read_jsonl(job.rows)
    peft = lora_config(LoraSection(**job.lora)) if job.lora else None
    load = lambda: load_causal_lm(job.model, job.device, attn=job.attn,  # noqa: E731
                                  trust_remote_code=job.trust_remote_code)
    ref_model = load() if job.ref_copy else None
    return TRAINERS[job.trainer].build(load(), tokenizer, rows, job.args, peft, ref_model, callbacks,
                                       **(job.options or {}))


def train(job: TrainJob, log: logging.Logger | logging.LoggerAdapter = _log) -> dict[str, Any]:
    """Train as `job` says and save the model to `job.model_dir`; every rank of a launch runs this.
    Returns what ran, read from the trainer: steps, loss, world size, distributed type."""
    from mlflow.tracking import MlflowClient

    from alignflow.models.generate import stop_token_ids
    from alignflow.models.loading import load_tokenizer
    from alignflow.tracking import MlflowMetricsCallback, flatten, log_params
    from alignflow.training.args import lora_targets
    from alignflow.training.run import active_paths

    if job.device == "cuda" and "LOCAL_RANK" in os.environ:  # each rank loads onto its own card
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    tokenizer = load_tokenizer(job.model, job.trust_remote_code)
    trainer = build_trainer(job, tokenizer, [MlflowMetricsCallback(job.run_id), CheckpointMarker()])
    accelerator, main = trainer.accelerator, trainer.accelerator.is_main_process
    client = MlflowClient()
    state = {"world_size": trainer.args.world_size, "num_processes": accelerator.num_processes,
             "distributed_type": accelerator.distributed_type.value}
    if main:
        log_params(job.run_id, flatten({"active": active_paths(trainer, trainer.model),
                                        "lora.resolved_targets": lora_targets(trainer.model), **state},
                                       "dpo" if job.trainer == "rft" else job.trainer))

    checkpoint = last_complete_checkpoint(job.args["output_dir"])
    if checkpoint is not None:
        log.info("%s: resuming from %s", job.stage, checkpoint)
        if main:
            client.set_tag(job.run_id, "alignflow.resumed_from", checkpoint.name)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    accelerator.wait_for_everyone()
    if main:
        client.log_metric(job.run_id, "global_step", result.global_step)
        for folder in Path(job.args["output_dir"]).glob("checkpoint-*"):  # the saved model replaces them
            shutil.rmtree(folder, ignore_errors=True)

    model_dir = Path(job.model_dir)
    model = accelerator.unwrap_model(trainer.model)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)
    if job.lora and job.merge_adapter:  # why: tasks.train_and_save
        if main:
            model.merge_and_unload().save_pretrained(str(model_dir), safe_serialization=True)
    else:
        trainer.save_model(str(model_dir))  # every rank takes part (FSDP gathers the weights), the main one writes
    if main:
        (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: no saved model carries one
        tokenizer.save_pretrained(str(model_dir))
    accelerator.wait_for_everyone()
    log.info("%s done: %d steps, train loss %.4f%s, %d process(es), %s", job.stage, result.global_step,
             result.training_loss, " (this rank's)" if state["num_processes"] > 1 else "", state["num_processes"],
             state["distributed_type"])
    return {"global_step": result.global_step, "training_loss": result.training_loss, **state}


# --- the stage's side -------------------------------------------------------------------------------------

def check_launch(section: str, launch, device: str) -> None:
    """Before any model loads: a launch this machine cannot honour. On CPU, accelerate turns any config into
    DDP over gloo (ACCELERATE_USE_CPU), so an FSDP or DeepSpeed config would silently not shard."""
    wanted = launch.distributed_type()
    if device == "cpu" and wanted not in CPU_LAUNCHABLE:
        raise ValueError(f"{section}.launch: {launch.config_file} asks for {wanted}, which needs CUDA devices; "
                         "on CPU a launch runs DDP (drop config_file, keep num_processes)")


def run_training(job: TrainJob, launch, log: logging.Logger | logging.LoggerAdapter = _log) -> dict[str, Any]:
    """Train in this process, or launched as `launch` (alignflow.config.LaunchSection) says. The model
    lands in `job.model_dir` only when training finished everywhere; the returned dict is `train`'s."""
    from alignflow.refs import digest_path

    final = Path(job.model_dir)
    partial = final.with_name(final.name + ".partial")
    trained = final.with_name(final.name + TRAINED_SUFFIX)
    if (done := _trained_before(final, trained)) is not None:
        from mlflow.tracking import MlflowClient

        log.info("%s: %s was trained by an earlier attempt of this stage whose run failed or was lost after "
                 "training (e.g. its upload): the model is used as it is, not trained again", job.stage, final)
        client = MlflowClient()
        client.set_tag(job.run_id, "alignflow.trained_before", str(final))
        client.log_metric(job.run_id, "global_step", done.get("global_step", 0))
        return done
    trained.unlink(missing_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    job = replace(job, model_dir=str(partial))
    try:
        result = launched(job, launch, log) if launch.launched() else train(job, log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    trained.write_text(json.dumps({"result": result, "digest": digest_path(final)}))
    return result


TRAINED_SUFFIX = ".trained.json"  # beside a model directory that training finished: its digest and result


def _trained_before(final: Path, trained: Path) -> dict[str, Any] | None:
    """The result of an earlier training of this (keyed) stage directory, if its model is still exactly what
    that training saved; a rerun after a failed upload then uploads it instead of training again."""
    from alignflow.refs import digest_path

    try:
        record = json.loads(trained.read_text())
    except (OSError, ValueError):
        return None
    if not final.is_dir() or digest_path(final) != record.get("digest"):
        return None
    return record.get("result")


def launch_command(launch, device: str, script_args: list[str], precision: str = "no") -> list[str]:
    """`accelerate launch` with the section's settings. With a config file, only the keys the section sets
    override the file's; without one, DDP over `num_processes` (on CPU over gloo: see the module's doc) in
    the trainer's own `precision` (no | fp16 | bf16) unless the section sets `mixed_precision`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    given = launch.model_fields_set
    if launch.config_file:
        cmd += ["--config_file", str(launch.config_file)]
    else:
        cmd += ["--multi_gpu", "--num_processes", str(launch.num_processes or 1), "--num_machines",
                str(launch.num_machines), "--machine_rank", str(launch.machine_rank), "--dynamo_backend", "no",
                "--mixed_precision", launch.mixed_precision or precision]
        given = given - {"num_processes", "num_machines", "machine_rank", "mixed_precision"}
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                "mixed_precision"):
        if key in given and getattr(launch, key) is not None:
            cmd += [f"--{key}", str(getattr(launch, key))]
    if launch.main_process_port is None and launch.num_machines == 1 and launch.config_file is None:
        cmd += ["--main_process_port", "0"]  # a free port: two launches on one machine must not collide
    return [*cmd, "-m", "alignflow.training.run", *script_args]


def launch_env(launch, device: str) -> dict[str, str]:
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        per_rank = max(1, (os.cpu_count() or 1) // max(1, (launch.num_processes or 1) // launch.num_machines))
        env |= {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(per_rank))}
        if launch.num_machines == 1:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def launched(job: TrainJob, launch, log: logging.Logger | logging.LoggerAdapter = _log,
             stop_grace: float = 30) -> dict[str, Any]:
    """Run `train(job)` on every rank of an accelerate launch; stream its output into `log`."""
    from alignflow.training.trainers import TRAINERS

    workdir = Path(job.args["output_dir"]).parent / "launch"
    shutil.rmtree(workdir / "errors", ignore_errors=True)
    (workdir / "errors").mkdir(parents=True, exist_ok=True)
    (workdir / "result.json").unlink(missing_ok=True)
    # a row added outside alignflow: the rank (a fresh interpreter) imports the module that defines its builder
    builder = TRAINERS[job.trainer].build.__module__
    (workdir / "job.json").write_text(json.dumps(asdict(job) | {"trainer_module": builder}, indent=1))
    precision = "bf16" if job.args.get("bf16") else "fp16" if job.args.get("fp16") else "no"
    cmd = launch_command(launch, job.device, [str(workdir / "job.json")], precision)
    log.info("%s: launching %s", job.stage, " ".join(cmd[1:]))
    tail: list[str] = []
    with open(workdir / "launch.log", "ab") as saved:
        proc = subprocess.Popen(cmd, env=launch_env(launch, job.device), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        try:
            stream_output(proc, log, tail, saved)
            code = proc.wait()
        finally:
            stop_group(proc, stop_grace)
    result = workdir / "result.json"
    if code == 0 and result.is_file():
        return json.loads(result.read_text())
    raise LaunchError(_failure(job.stage, workdir, code, tail))


def _failure(stage: str, workdir: Path, code: int, tail: list[str]) -> str:
    """The rank that failed first, as the launcher's root-cause report names it, with its own error when it
    wrote one (a rank killed by a signal writes none; the others then fail on the broken connection)."""
    errors = {e["rank"]: e for e in (json.loads(p.read_text()) for p in (workdir / "errors").glob("rank-*.json"))}
    where = f"(full output in {workdir / 'launch.log'})"
    root = torchrun_root_cause(tail)
    if root is not None:
        rank, reason = root
        if rank in errors:
            return f"{stage}: rank {rank} of {errors[rank]['world_size']} failed: {errors[rank]['error']} {where}"
        return f"{stage}: launched training exited with code {code}: rank {rank} failed first: {reason} {where}"
    if errors:
        first = min(errors.values(), key=lambda e: e["time"])
        return f"{stage}: rank {first['rank']} of {first['world_size']} failed: {first['error']} {where}"
    said = [line.strip() for line in tail if re.search(r"\brank\b|exitcode|Signal \d+|Error", line)]
    return f"{stage}: launched training exited with code {code}: " + " | ".join(said[-8:]) + f" {where}"


def _rank_main(job_file: str) -> None:
    """A launched rank: run `train`, write the result (main rank) or this rank's error."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', 0)}] %(message)s")
    workdir = Path(job_file).parent
    payload = json.loads(Path(job_file).read_text())
    builder = payload.pop("trainer_module", "alignflow.training.trainers")
    job = TrainJob(**payload)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        importlib.import_module(builder)  # the trainers table's row for job.trainer (a failure is this rank's error)
        result = train(job)
    except BaseException as err:
        (workdir / "errors" / f"rank-{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": world, "time": time.time(), "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()}))
        raise
    if rank == 0:
        tmp = workdir / "result.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, workdir / "result.json")


if __name__ == "__main__":
    _rank_main(sys.argv[1])
