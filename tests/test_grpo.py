"""The grpo stage (tasks/grpo.py): TRL's GRPOTrainer on the rankers' rewards, beside DPO on the same SFT model.

Before any model loads, a reward that cannot score a completion alone, a weight per reward that does not add up,
and prompts that lack what a reward checks are refused by name. On the tiny embedded model, one stage run logs
what GRPO's users watch per step (reward and its spread per group, groups without spread, completion length,
truncated share) into its MLflow run, and at learning rate 0 saves the very weights it started from; the whole
flow with `dpo.baselines: [grpo]` evaluates it, reports its curves and compares it like the other baselines.

On SmolLM2-135M-Instruct (real_model): rewarded for answering in fewer than 20 words, a few GRPO steps raise the
share of unseen prompts whose greedy answer is that short; at learning rate 0 every greedy answer stays the
policy's.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from alignflow.config import ConfigError, load_config
from alignflow.data.records import DataError
from alignflow.models.loading import load_causal_lm
from tests.conftest import SMOKE
from tests.test_stages import base_ref, child_run, dataset_ref

GRPO = ["dpo.baselines=[grpo]"]
# two optimizer steps of 2 prompts x 4 completions each: enough to log every per-step metric twice
TINY_STEPS = ["grpo.trainer.num_generations=4", "grpo.trainer.per_device_train_batch_size=8",
              "grpo.trainer.max_completion_length=12", "grpo.trainer.max_steps=2", "grpo.trainer.logging_steps=1"]
WATCHED = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
           "rewards/verifier/mean"]


@pytest.mark.parametrize("overrides, message", [
    (["grpo.rewards=[human]"], "grpo.rewards: the human ranker labels sampled candidates between stages"),
    (["rank.ranker=human"], r"grpo \(rewarded by rank.ranker\): the human ranker"),
    (["grpo.rewards=[{type: ensemble, rankers: [verifier, checker]}]"],
     "grpo.rewards: the ensemble ranker orders a prompt's answers against each other"),
    (["grpo.trainer.reward_weights=[1.0, 2.0]"], r"grpo.trainer.reward_weights has 2 weight\(s\) for 1 reward\(s\)"),
    (["grpo.trainer.loss_type=ppo"], r"grpo.trainer.loss_type 'ppo' is not one of TRL's: .*\bdapo\b"),
    (["grpo.trainer.num_generations=3"], r"grpo.trainer: generation_batch_size \(8\) must be divisible by "
                                         r"num_generations \(3\)"),
])
def test_what_grpo_cannot_train_on_is_refused_before_any_model_loads(overrides, message):
    from tasks import stages

    config = load_config(SMOKE, GRPO + overrides)
    with pytest.raises(ConfigError, match=f"stage grpo: {message}"):
        stages.check_config(config, "cpu")


def test_prompts_without_what_the_reward_checks_are_refused_by_row(tmp_path):
    """GRPO's reward checks the sampling prompts even when the pairs' ranker would not: the constraints reward
    needs every prompt's constraints (the smoke prompts have none), named by row and field before any model loads."""
    from tasks.load_data import preflight

    common = [f"output_dir={tmp_path}", "rank.ranker=verifier"]
    preflight(load_config(SMOKE, common + GRPO), "cpu")  # the verifier reward: the prompts carry reference answers
    with pytest.raises(DataError, match="needed by the constraints ranker") as err:
        preflight(load_config(SMOKE, common + GRPO + ["grpo.rewards=[constraints]"]), "cpu")
    assert (err.value.row, err.value.field) == (1, "instruction_id_list")


def child_run_named(client: MlflowClient, parent, name: str):
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                              f"tags.`alignflow.stage` = '{name}'")
    assert len(runs) == 1
    return runs[0]


def grpo_run(overrides: list[str], policy: str, rows: list[dict], ctx, tmp_path: Path, name: str = "grpo"):
    from tasks.grpo import grpo

    config = load_config(SMOKE, GRPO + TINY_STEPS + overrides)
    return grpo.fn(config.grpo, config.rank, base_ref(policy), dataset_ref(rows, tmp_path / f"{name}.jsonl"), ctx,
                   name=name)


@pytest.mark.slow
def test_grpo_logs_what_its_users_watch_and_learns_nothing_at_rate_zero(tiny_model_path, smoke_data, run_ctx,
                                                                         tmp_path):
    rows = smoke_data["prompts"][:8]
    trained = grpo_run(["grpo.trainer.learning_rate=1e-2"], tiny_model_path, rows, run_ctx, tmp_path)
    client = MlflowClient()
    run = child_run(run_ctx, "grpo")
    for key in WATCHED:  # TRL's per-step metrics, one point per logged step
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.params["grpo.rewards"] == "['verifier']"
    assert run.data.params["grpo.trainer.num_generations"] == "4"
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    moved = load_causal_lm(trained.local_path, "cpu").state_dict()
    start = load_causal_lm(tiny_model_path, "cpu").state_dict()
    assert any(not torch.equal(moved[k], start[k]) for k in start)  # a rate that learns moves some weight

    still = grpo_run(["grpo.trainer.learning_rate=0"], tiny_model_path, rows, run_ctx, tmp_path, name="grpo-lr0")
    kept = load_causal_lm(still.local_path, "cpu").state_dict()
    assert all(torch.equal(kept[k], start[k]) for k in start)


def test_the_registry_candidate_must_be_a_model_the_config_trains():
    from tasks import stages

    with pytest.raises(ConfigError, match=r"stage promote: registry.candidate: 'grpo' is not a model this config "
                                          r"trains; choose from \['dpo'\]"):
        stages.check_config(load_config(SMOKE, ["registry.candidate=grpo"]), "cpu")
    stages.check_config(load_config(SMOKE, GRPO + ["registry.candidate=grpo"]), "cpu")


@pytest.mark.slow
def test_the_flow_evaluates_reports_compares_and_registers_grpo_beside_dpo(tmp_path, mlflow_store):
    from flows.pipeline import align

    config = load_config(SMOKE, GRPO + TINY_STEPS + [f"output_dir={tmp_path / 'out'}", "registry.candidate=grpo",
                                                     "grpo.trainer.learning_rate=1e-3"])
    result = align(config)
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    for model in ("sft", "dpo", "grpo"):
        assert 0 <= metrics[f"{model}.accuracy"] <= 1
    assert "grpo.delta_vs_sft_ci95_low" in metrics
    # the challenger is the GRPO model, under its own registered name, whatever the decision
    assert result["promotion"]["candidate"] == "grpo" and result["promotion"]["model"] == "alignflow-smoke-grpo"
    challenger = client.get_model_version_by_alias("alignflow-smoke-grpo", "challenger")
    assert challenger.tags["alignflow.stage_run"] == child_run_named(client, parent, "grpo").info.run_id
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/grpo_curves.png" in report
    text = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report/report.md",
                                                    dst_path=str(tmp_path / "dl"))).read_text()
    assert "grpo_curves.png" in text and "| **grpo** |" in text


# --- SmolLM2-135M-Instruct -------------------------------------------------------------------------------------

WORDS = 20  # a limit the model's greedy paragraphs overshoot and some of its samples meet (the measurement)
TOPICS = ["the sea", "coffee", "trains", "winter", "libraries", "bees", "bread", "rivers", "chess", "the moon",
          "gardens", "bicycles", "rain", "owls", "museums", "maps", "tea", "volcanoes", "kites", "deserts"]
LIMIT = [{"id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": WORDS}}]
REAL_STEPS = ["grpo.rewards=[constraints]", "grpo.lora.enabled=true", "grpo.trainer.num_generations=4",
              "grpo.trainer.per_device_train_batch_size=16", "grpo.trainer.max_completion_length=40",
              "grpo.trainer.logging_steps=1"]


def short_rows(topics: list[str]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Write a short paragraph about {t}. Answer with less than "
                                                    f"{WORDS} words."}], "constraints": LIMIT, "task": "length"}
            for t in topics]


def greedy(path: str, rows: list[dict]) -> list[str]:
    from alignflow.models.generate import generate
    from alignflow.models.loading import load_tokenizer

    model, tokenizer = load_causal_lm(path, "cpu"), load_tokenizer(path)
    return [a[0]["text"] for a in generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=48)]


def met(answers: list[str]) -> float:
    from alignflow.rankers.constraints import Constraints

    return sum(Constraints().reward(a, LIMIT) for a in answers) / len(answers)


@pytest.mark.slow
@pytest.mark.real_model
def test_grpo_raises_a_reward_smollm2_can_reach(smollm2_dir, run_ctx, tmp_path):
    held = short_rows(TOPICS[12:])  # topics GRPO never trains on
    before = met(greedy(str(smollm2_dir), held))
    trained = grpo_run(REAL_STEPS + ["grpo.trainer.learning_rate=1e-3", "grpo.trainer.max_steps=8"],
                       str(smollm2_dir), short_rows(TOPICS[:12]), run_ctx, tmp_path)
    after = met(greedy(trained.local_path, held))
    rewards = [m.value for m in sorted(MlflowClient().get_metric_history(child_run(run_ctx, "grpo").info.run_id,
                                                                           "reward"), key=lambda m: m.step)]
    assert after >= before + 0.25, (before, after, rewards)
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4, rewards  # the reward it trained on rose too


@pytest.mark.slow
@pytest.mark.real_model
def test_grpo_at_rate_zero_answers_like_its_policy(smollm2_dir, run_ctx, tmp_path):
    rows = short_rows(TOPICS[:8])
    still = grpo_run(REAL_STEPS + ["grpo.trainer.learning_rate=0", "grpo.trainer.max_steps=1"], str(smollm2_dir),
                     rows, run_ctx, tmp_path)
    assert greedy(still.local_path, rows) == greedy(str(smollm2_dir), rows)
