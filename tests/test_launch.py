"""Training stages launched as two real processes (accelerate launch, DDP on CPU over gloo), against the
same stage in one process: same loss curve at equal global batch, world size 2 read from the trainer's own
state, only the main rank logging, a killed rank failing the stage cleanly and the rerun resuming."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from alignflow.config import LaunchSection, LoraSection, load_config
from alignflow.training.run import COMPLETE_MARKER, LaunchError, launch_command
from tasks.dpo import dpo
from tasks.sft import sft
from tests.conftest import SMOKE
from tests.test_stages import base_ref, child_run, dataset_ref

pytestmark = pytest.mark.slow
TWO = LaunchSection(num_processes=2)


def sft_section(smoke_config, per_device: int, launch: LaunchSection = LaunchSection(), **trainer):
    trainer = {**smoke_config.sft.trainer, "per_device_train_batch_size": per_device, "max_steps": 6,
               "logging_steps": 1, **trainer}
    return smoke_config.sft.model_copy(update={"trainer": trainer, "launch": launch, "checkpoint_steps": 0})


def losses(run_id: str, key: str = "loss") -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def launched_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_two_process_sft_matches_one_process(smoke_config, tiny_model_path, smoke_data, run_ctx, tmp_path):
    data = dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl")
    one = sft.fn(sft_section(smoke_config, 4), base_ref(tiny_model_path), data, run_ctx)
    one_run = child_run(run_ctx, "sft")
    ctx2 = run_ctx.model_copy(update={"output_dir": str(tmp_path / "two")})
    two = sft.fn(sft_section(smoke_config, 2, TWO), base_ref(tiny_model_path), data, ctx2)
    client = MlflowClient()
    two_run = next(r for r in client.search_runs([run_ctx.experiment_id], "tags.`alignflow.stage` = 'sft'")
                   if r.info.run_id != one_run.info.run_id)

    # what ran, from the trainer's own state in the launched processes
    params = two_run.data.params
    assert (params["sft.world_size"], params["sft.num_processes"], params["sft.distributed_type"]) == \
        ("2", "2", "MULTI_CPU")
    assert params["sft.launch.num_processes"] == "2"
    assert one_run.data.params["sft.world_size"] == "1"
    # equal global batch (1 x 4 = 2 x 2): the same data in the same order, the same loss curve
    curve1, curve2 = losses(one_run.info.run_id), losses(two_run.info.run_id)
    assert len(curve1) == len(curve2) == 6  # one value per step: only the main rank logged
    assert curve2 == pytest.approx(curve1, rel=1e-3), (curve1, curve2)
    assert curve2[-1] < curve2[0]
    w1, w2 = load_file(f"{one.local_path}/model.safetensors"), load_file(f"{two.local_path}/model.safetensors")
    base = load_file(f"{tiny_model_path}/model.safetensors")
    assert any(not torch.equal(base[k], w2[k]) for k in base)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    assert two.uri == f"runs:/{two_run.info.run_id}/model" and two_run.info.status == "FINISHED"
    assert not list(Path(ctx2.output_dir).glob("**/model.partial"))
    assert "training_args.bin" not in os.listdir(two.local_path)
    assert not launched_processes(str(Path(ctx2.output_dir) / "sft" / "launch" / "job.json"))


def test_two_process_lora_dpo_matches_one_process(smoke_config, tiny_model_path, smoke_data, run_ctx, tmp_path):
    rejected = [{"role": "assistant", "content": "no idea"}]
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rejected}
            for r in smoke_data["prompts"][:16]]
    pairs = dataset_ref(rows, tmp_path / "pairs.jsonl")
    policy = base_ref(tiny_model_path)

    def section(per_device, launch=LaunchSection()):
        trainer = {**smoke_config.dpo.trainer, "per_device_train_batch_size": per_device, "max_steps": 4,
                   "logging_steps": 1, "learning_rate": 5e-3}
        return smoke_config.dpo.model_copy(update={"trainer": trainer, "launch": launch, "checkpoint_steps": 0,
                                                   "lora": LoraSection(enabled=True, r=4, alpha=8, dropout=0.0)})

    dpo.fn(section(4), policy, pairs, run_ctx)
    one_run = child_run(run_ctx, "dpo")
    ctx2 = run_ctx.model_copy(update={"output_dir": str(tmp_path / "two")})
    two = dpo.fn(section(2, TWO), policy, pairs, ctx2)
    two_run = MlflowClient().get_run(two.run_id)
    assert two_run.data.params["dpo.world_size"] == "2"
    assert two_run.data.params["dpo.distributed_type"] == "MULTI_CPU"
    assert two_run.data.tags["alignflow.lora_merged"] == "true"
    for key in ("loss", "rewards/chosen"):
        curve1, curve2 = losses(one_run.info.run_id, key), losses(two_run.info.run_id, key)
        assert len(curve2) == 4 and curve2 == pytest.approx(curve1, rel=1e-2, abs=1e-4), (key, curve1, curve2)
    assert losses(two_run.info.run_id)[-1] < losses(two_run.info.run_id)[0]


def kill_rank_once_checkpointed(trainer_dir: Path, job_file: str, rank: str, found: dict, timeout: float = 240):
    """SIGKILL the launched process of `rank` as soon as a complete checkpoint exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(trainer_dir.glob(f"checkpoint-*/{COMPLETE_MARKER}")):
            for proc in launched_processes(job_file):
                try:
                    if proc.environ().get("RANK") == rank and "alignflow.training.run" in proc.cmdline():
                        proc.send_signal(signal.SIGKILL)
                        found["pid"] = proc.pid
                        return
                except psutil.Error:
                    continue
        time.sleep(0.05)


def test_a_killed_rank_fails_the_stage_and_the_rerun_resumes(smoke_config, tiny_model_path, smoke_data, run_ctx,
                                                              tmp_path):
    data = dataset_ref(smoke_data["sft"] * 4, tmp_path / "sft.jsonl")
    cfg = sft_section(smoke_config, 2, TWO, max_steps=80).model_copy(update={"checkpoint_steps": 4})
    stage = Path(run_ctx.output_dir) / "sft"
    job_file = str(stage / "launch" / "job.json")
    found: dict = {}
    killer = threading.Thread(target=kill_rank_once_checkpointed, args=(stage / "trainer", job_file, "1", found))
    killer.start()
    try:
        with pytest.raises(LaunchError) as failed:
            sft.fn(cfg, base_ref(tiny_model_path), data, run_ctx)
    finally:
        killer.join(timeout=300)
    assert found, "no rank 1 process was found to kill"
    message = str(failed.value)
    assert "exited with code" in message and ("SIGKILL" in message or "Signal 9" in message), message
    assert not (stage / "model").exists() and not (stage / "model.partial").exists()  # no half-saved model
    assert not launched_processes(job_file)  # rank 0 and the launcher went with it
    killed = child_run(run_ctx, "sft")
    assert killed.info.status == "FAILED"

    resumed = sft.fn(cfg, base_ref(tiny_model_path), data, run_ctx)
    runs = MlflowClient().search_runs([run_ctx.experiment_id], "tags.`alignflow.stage` = 'sft'",
                                      order_by=["attributes.start_time DESC"])
    last = runs[0]
    assert last.info.run_id == resumed.run_id and last.info.status == "FINISHED"
    assert last.data.tags["alignflow.resumed_from"].startswith("checkpoint-")
    step = int(last.data.tags["alignflow.resumed_from"].split("-")[1])
    # trained on from the checkpoint, not again from step 0: its first logged step comes after the checkpoint's
    # and it trained only the steps left (logging_steps=1: one loss value a step)
    logged = sorted(m.step for m in MlflowClient().get_metric_history(last.info.run_id, "loss"))
    assert 4 <= step < 80 and logged == list(range(step + 1, 81)), (step, logged)
    assert last.data.metrics["global_step"] == 80 and last.data.params["sft.world_size"] == "2"
    assert not list((stage / "trainer").glob("checkpoint-*"))


def test_a_rank_error_names_the_rank_and_its_error(smoke_config, tiny_model_path, run_ctx, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "no completion"}) + "\n")
    with pytest.raises(LaunchError, match=r"sft: rank [01] of 2 failed: KeyError: 'completion'"):
        sft.fn(sft_section(smoke_config, 2, TWO), base_ref(tiny_model_path), dataset_ref(
            [json.loads(bad.read_text())], bad), run_ctx)
    assert child_run(run_ctx, "sft").info.status == "FAILED"


def test_launch_settings_reach_accelerate_and_bad_ones_are_refused(tmp_path):
    cmd = launch_command(LaunchSection(num_processes=8, mixed_precision="bf16"), "cuda", ["job.json"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-3:] == ["-m", "alignflow.training.run", "job.json"]
    multi = LaunchSection(num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                          main_process_port=29500)
    cmd = launch_command(multi, "cuda", ["job.json"])
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1"
    assert not LaunchSection().launched() and TWO.launched()

    from alignflow.config import ConfigError

    with pytest.raises(ConfigError, match="machine_rank"):
        load_config(SMOKE, ["sft.launch.num_machines=2", "sft.launch.machine_rank=2",
                            "sft.launch.main_process_ip=10.0.0.1"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(SMOKE, [f"dpo.launch.config_file={tmp_path / 'nope.yaml'}"])
    # on CPU an FSDP config would silently run as DDP: refused before any model loads
    from tasks.stages import check_config

    fsdp = Path(__file__).resolve().parents[1] / "infra" / "accelerate" / "fsdp2.yaml"
    with pytest.raises(ConfigError, match="needs CUDA"):
        check_config(load_config(SMOKE, [f"sft.launch.config_file={fsdp}"]), "cpu")
