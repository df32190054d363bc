"""A new TRL trainer as a contributor adds it: one row in the trainers table and its stage module, both in
this test module (no edit anywhere else). The row is TRL's KTOTrainer (unpaired preferences: each pair's
chosen answer is desirable, its rejected one undesirable); the stage function is written as tasks/rft.py is, with the
training-stage helpers of tasks/__init__.py.

    .venv/bin/python -m pytest -q tests/test_new_trainer.py
"""

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import DPOSection
from alignflow.models.loading import load_causal_lm
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext
from alignflow.training.trainers import TRAINERS, Trainer
from tasks import check_training, preference_inputs, train_stage, trainer_arguments
from tasks.caching import stage_dir
from tests.test_stages import base_ref, dataset_ref


def kto_trainer(model, tokenizer, pairs, args, peft_config=None, ref_model=None, callbacks=()):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]
    return KTOTrainer(model=model, ref_model=ref_model, args=KTOConfig(**args), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))


TRAINERS["kto"] = Trainer(config="KTOConfig", build=kto_trainer, answers=("chosen", "rejected"), preference=True)


@task(name="kto", cache_policy=NONE)
def kto(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, cache_key: str | None = None
        ) -> ModelRef:
    out_dir = stage_dir(ctx, "kto", cache_key)
    args = trainer_arguments(cfg, "kto", ctx.device, ctx.seed, out_dir / "trainer")
    return train_stage(ctx, "kto", "kto", cfg, "kto", args, policy, out_dir, cache_key,
                       inputs=lambda: preference_inputs(policy, pairs, "kto"), params={"policy": policy.uri},
                       merge_adapter=True)


@pytest.fixture
def kto_section(smoke_config):
    # KTOConfig's own keys: the DPO section's trainer keys it shares, plus one only KTO has
    trainer = {"learning_rate": 5e-3, "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
               "beta": 0.1, "desirable_weight": 1.0}
    return smoke_config.dpo.model_copy(update={"trainer": trainer, "checkpoint_steps": 0})


def test_a_trainer_row_and_its_stage_train_a_model_on_the_table_alone(kto_section, tiny_model_path, smoke_data,
                                                                       run_ctx, tmp_path):
    rejected = [{"role": "assistant", "content": "no idea"}]
    pairs = dataset_ref([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rejected}
                         for r in smoke_data["prompts"][:16]], tmp_path / "pairs.jsonl")
    trained = kto.fn(kto_section, base_ref(tiny_model_path), pairs, run_ctx)

    run = MlflowClient().get_run(trained.run_id)
    assert run.data.tags["alignflow.stage"] == "kto"
    history = MlflowClient().get_metric_history(trained.run_id, "loss")
    assert len(history) >= 2  # KTO's own training curve, logged into the stage's run
    assert "kl" in run.data.metrics  # a metric only KTOTrainer logs: it, not SFT or DPO, trained
    assert "watch.length_ratio" in run.data.metrics  # a preference row: the watch read its pairs
    before, after = load_causal_lm(tiny_model_path, "cpu"), load_causal_lm(trained.local_path, "cpu")
    changed = [name for (name, p), q in zip(before.named_parameters(), after.parameters()) if not torch.equal(p, q)]
    assert changed, "KTO changed no weight"


def test_the_row_names_the_config_its_keys_are_checked_against(kto_section, tmp_path):
    """The stage's own check (what `alignflow validate` runs) builds the row's TRL config: a misspelt KTO key is
    named before any model loads."""
    bad = kto_section.model_copy(update={"trainer": {"desirable_weigth": 2.0}})
    with pytest.raises(ValueError, match="desirable_weigth"):
        check_training("kto", "kto", trainer_arguments(bad, "kto", "cpu", 0, tmp_path), "dpo", bad.launch, "cpu")
    check_training("kto", "kto", trainer_arguments(kto_section, "kto", "cpu", 0, tmp_path), "dpo", bad.launch, "cpu")
