"""A new TRL trainer as a contributor adds it: one row in the trainers table and its stage module, both in
this test module (no edit anywhere else). The row is TRL's KTOTrainer (unpaired preferences: each pair's
chosen answer is desirable, its rejected one undesirable); the stage function is written as tasks/rft.py is.

    .venv/bin/python -m pytest -q tests/test_new_trainer.py
"""

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import DPOSection
from alignflow.models.loading import attn_implementation, load_causal_lm
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext, flatten, stage_run
from alignflow.training.args import build_trl_config, trainer_args
from alignflow.training.run import TrainJob
from alignflow.training.trainers import TRAINERS, Trainer
from tasks import preference_inputs, train_and_save
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


def kto_args(cfg: DPOSection, device: str, seed: int, out_dir) -> dict:
    attn = attn_implementation(cfg.attn_implementation, device)
    return trainer_args(cfg.trainer, device, seed, out_dir, cfg.checkpoint_steps, TRAINERS["kto"].config, attn)


@task(name="kto", cache_policy=NONE)
def kto(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, cache_key: str | None = None
        ) -> ModelRef:
    out_dir = stage_dir(ctx, "kto", cache_key)
    args = kto_args(cfg, ctx.device, ctx.seed, out_dir / "trainer")
    with stage_run(ctx, "kto", flatten({"trainer": args}, "kto"), cache_key) as run_id:
        rows_path, policy_path, tokenizer = preference_inputs(policy, pairs, "kto")
        job = TrainJob(stage="kto", trainer="kto", rows=rows_path, model=policy_path, device=ctx.device, args=args,
                       run_id=run_id, model_dir=str(out_dir / "model"), merge_adapter=True)
        return train_and_save(job, cfg, tokenizer, policy)


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
    args = kto_args(kto_section.model_copy(update={"trainer": {"desirable_weigth": 2.0}}), "cpu", 0, tmp_path)
    with pytest.raises(ValueError, match="desirable_weigth"):
        build_trl_config("kto", TRAINERS["kto"].config, args)
