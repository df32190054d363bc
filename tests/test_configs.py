from pathlib import Path

import pytest

from alignflow.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "smoke.yaml", "qwen2.5-0.5b-lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    config = load_config(path)
    assert load_config(path).digest() == config.digest()  # the config hash is stable ...
    assert load_config(path, ["seed=12345"]).digest() != config.digest()  # ... and follows the content


def test_override_is_applied_and_typed(tmp_path):
    config = load_config(CONFIGS[0].parent / "smoke.yaml",
                         ["sft.trainer.learning_rate=1e-4", "sample.num_candidates=6", "sft.lora.enabled=true"])
    assert config.sft.trainer["learning_rate"] == pytest.approx(1e-4)
    assert config.sample.num_candidates == 6
    assert config.sft.lora.enabled is True


@pytest.mark.parametrize("override, named", [
    ("sft.bogus=1", "sft.bogus"),
    ("experimnt=x", "experimnt"),
    ("sft.trainer.lerning_rate=0.1", "lerning_rate"),
    ("dpo.trainer.betta=0.1", "betta"),
    ("sample.num_candidates=1", "sample.num_candidates"),
    ("sample.temperature=hot", "sample.temperature"),
    ("rank.ranker=oracle", "rank.ranker"),
    ("rank.pairs=widest", "rank.pairs"),
    ("sample.engine=warp", "sample.engine"),
    ("rank.ranker={type: reward_model, model: rm, batch_sise: 8}", "batch_sise"),  # the component's own schema
])
def test_bad_key_or_value_names_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0].parent / "smoke.yaml", [override])
    assert named in str(err.value)


def test_unknown_baseline_is_named_before_any_model_loads():
    """Which baselines exist is the stage registry's knowledge (tasks.stages), so the stages' check names an
    unknown one: `alignflow validate` and `run` call it before any model loads."""
    from tasks.stages import check_config

    config = load_config(CONFIGS[0].parent / "smoke.yaml", ["dpo.baselines=[ppo]"])
    with pytest.raises(ConfigError, match=r"dpo.baselines: unknown baseline\(s\) \['ppo'\]; choose from .*rft"):
        check_config(config, "cpu")


def test_reward_model_ranker_needs_a_model():
    with pytest.raises(ConfigError, match="rank.ranker: .*reward_model.*model: Field required"):
        load_config(CONFIGS[0].parent / "smoke.yaml", ["rank.ranker=reward_model"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(CONFIGS[0].parent / "smoke.yaml", ["no_equals_sign"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


ACCELERATE = sorted((Path(__file__).resolve().parents[1] / "infra" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_every_accelerate_config_loads_and_launches_what_it_says(path):
    """infra/accelerate/: accelerate itself reads each file (unknown keys are its error), and a stage's
    launch section takes it; the set covers what docs/scale.md ("Running on several GPUs") promises."""
    from accelerate.commands.config.config_args import load_config_from_file

    from alignflow.config import LaunchSection
    from alignflow.training.run import launch_command

    loaded = load_config_from_file(str(path))
    launch = LaunchSection(config_file=str(path))
    assert launch.launched() and launch.distributed_type() == loaded.distributed_type.value
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED",
                "zero3": "DEEPSPEED", "multi_node": "MULTI_GPU"}
    assert loaded.distributed_type.value == expected[path.stem]
    if path.stem == "multi_node":
        assert loaded.num_machines > 1 and loaded.main_process_ip
    cmd = launch_command(LaunchSection(config_file=str(path), machine_rank=0), "cuda", ["job.json"])
    assert cmd[cmd.index("--config_file") + 1] == str(path) and "--machine_rank" in cmd


def test_the_accelerate_configs_are_all_there():
    assert {p.stem for p in ACCELERATE} == {"single_gpu", "multi_gpu", "fsdp2", "zero2", "zero3", "multi_node"}
