"""configs/smollm2-ifeval.yaml shrunk, on the real SmolLM2-135M-Instruct: the constraint suite through the whole
chain (SFT on verified rewrites -> candidates -> constraints ranker -> DPO -> evaluation by the checkers).

The numbers that say the recipe helps come from bench/quality.py --ifeval (docs/results.md); this test
checks what must hold at any size: SFT changes the base model's answers, DPO at the recipe's learning rate
changes some of SFT's, DPO at learning rate 0 answers exactly like SFT (a second run that reuses the cached
SFT, sampling and ranking), and the evaluation reports seen and held-out types and every type asked.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import load_config
from alignflow.constraints import HELD_OUT_TYPES
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
CONFIG = ROOT / "configs" / "smollm2-ifeval.yaml"
SHRUNK = ["embedded.constraints.sft_examples=32", "embedded.constraints.prompt_examples=8",
          "embedded.constraints.eval_examples=8", "embedded.constraints.held_out_examples=4",
          "base.score_examples=4", "sft.trainer.max_steps=8", "sft.trainer.per_device_train_batch_size=4",
          "sample.max_new_tokens=32", "dpo.baselines=[]", "dpo.trainer.max_steps=4",
          "dpo.trainer.per_device_train_batch_size=4", "eval.max_new_tokens=32", "eval.bootstrap=100",
          "eval.samples_logged=12", "registry.enabled=false"]


def answers_of(client: MlflowClient, parent_id: str) -> tuple[dict, dict[str, list[str]]]:
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    evaluate = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                  "tags.`alignflow.stage` = 'evaluate'")[0]
    samples = client.load_table(parent.info.experiment_id, "eval_samples.json", run_ids=[evaluate.info.run_id])
    return parent.data.metrics, {name: list(group.sort_values("prompt")["answer"])
                                 for name, group in samples.groupby("model")}


def test_the_ifeval_recipe_shrunk(prefect_server, smollm2_dir, tmp_path):
    from flows.pipeline import align

    client = MlflowClient()
    base = [f"output_dir={tmp_path / 'out'}", "experiment=ifeval-test", *SHRUNK]
    trained = align(load_config(CONFIG, base))
    metrics, answers = answers_of(client, trained["parent_run_id"])
    assert answers["sft"] != answers["base"]  # SFT is a real step of the chain
    assert answers["dpo"] != answers["sft"]  # at the recipe's rate DPO moved some answers
    for model in ("base", "sft", "dpo"):
        for key in ("accuracy.seen", "accuracy.held_out", "accuracy_loose", "instruction_accuracy",
                    "instruction_accuracy_loose"):
            assert 0.0 <= metrics[f"{model}.{key}"] <= 1.0, (model, key)
    asked = {k.split(".", 2)[2] for k in metrics if k.startswith("sft.instruction_accuracy.")}
    assert {t.replace(":", ".") for t in HELD_OUT_TYPES} & asked  # held-out types were asked and scored
    assert "dpo.delta_vs_sft.seen" in metrics and "dpo.delta_vs_sft_ci95_low.held_out" in metrics
    # the report shows IFEval's accuracies and a plot per constraint type (parent run, report/)
    report = {a.path for a in client.list_artifacts(trained["parent_run_id"], "report")}
    assert "report/constraints_by_type.png" in report
    import mlflow

    text = mlflow.artifacts.load_text(f"runs:/{trained['parent_run_id']}/report/report.md")
    assert "## Verifiable constraints" in text and "instruction strict" in text

    # the same run with DPO at learning rate 0: SFT, sampling and ranking come from the cache, DPO changes nothing
    frozen = align(load_config(CONFIG, [*base, "dpo.trainer.learning_rate=0.0"]))
    _, still = answers_of(client, frozen["parent_run_id"])
    assert still["sft"] == answers["sft"]
    assert still["dpo"] == still["sft"]
