"""The MLflow Model Registry: registration, the challenger alias, and the champion rule."""

import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import RegistrySection, load_config
from alignflow.registry import alias_version
from flows.pipeline import align
from tasks.promote import promote
from tests.conftest import SMOKE
from tests.test_stages import base_ref, dataset_ref

pytestmark = pytest.mark.slow


def evaluated(correct: list[float]) -> dict:
    """An evaluation's results as promote reads them: the challenger's per-prompt correctness."""
    return {"correct": {"dpo": correct}}


def test_champion_moves_only_when_the_interval_clears_the_champion(smoke_config, tiny_model_path, smoke_data,
                                                                   run_ctx, tmp_path):
    """Real registry and a real evaluation of the champion; the challenger's per-prompt results are
    given, so both branches of the rule are exercised on the same models."""
    eval_rows = smoke_data["eval"]
    data = dataset_ref(eval_rows, tmp_path / "eval.jsonl")
    sft_model = base_ref(tiny_model_path)
    variants = []
    for i in range(3):  # same weights, different content digests: three distinct registered models
        copy = tmp_path / f"model{i}"
        shutil.copytree(tiny_model_path, copy)
        (copy / "variant.txt").write_text(str(i))
        variants.append(base_ref(str(copy)))
    cfg, n = RegistrySection(), len(eval_rows)
    client = MlflowClient()

    first = promote.fn(cfg, "reg", sft_model, variants[0], data, smoke_config.eval, evaluated([0.0] * n), run_ctx)
    assert first["decision"] == "first champion"
    assert str(alias_version("reg-dpo", "champion").version) == str(alias_version("reg-dpo", "challenger").version) == "1"
    assert client.get_model_version("reg-sft", "1").tags["alignflow.digest"] == sft_model.digest

    # the champion (the untuned tiny model) answers nothing correctly: a challenger right everywhere clears it
    second = promote.fn(cfg, "reg", sft_model, variants[1], data, smoke_config.eval, evaluated([1.0] * n), run_ctx)
    assert second["decision"] == "promoted" and second["delta_ci95_low"] > 0
    assert second["champion_accuracy"] == 0.0 and second["previous_champion_version"] == 1
    assert str(alias_version("reg-dpo", "champion").version) == "2"

    # one no better than the champion stays challenger
    third = promote.fn(cfg, "reg", sft_model, variants[2], data, smoke_config.eval, evaluated([0.0] * n), run_ctx)
    assert third["decision"] == "kept champion" and third["delta_ci95_low"] <= 0
    assert str(alias_version("reg-dpo", "champion").version) == "2"
    assert str(alias_version("reg-dpo", "challenger").version) == "3"
    # the SFT model's content did not change: no new version
    assert [str(v.version) for v in client.search_model_versions("name = 'reg-sft'")] == ["1"]
    parent = client.get_run(run_ctx.parent_run_id)
    assert parent.data.tags["alignflow.promotion"] == "kept champion"

    # the registered model loads back through MLflow and answers
    answers = mlflow.pyfunc.load_model("models:/reg-dpo@champion").predict(["Count the words.\n\nred fox"])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_flow_registers_and_reports_the_decision(prefect_server, tmp_path):
    overrides = [f"output_dir={tmp_path / 'out'}", "experiment=promo", "eval.pass_k=0"]
    first = align(load_config(SMOKE, overrides))
    second = align(load_config(SMOKE, [*overrides, "dpo.trainer.beta=0.3"]))
    assert first["promotion"]["decision"] == "first champion"
    decision = second["promotion"]
    assert decision["decision"] in ("promoted", "kept champion")
    assert (decision["decision"] == "promoted") == (decision["delta_ci95_low"] > 0)
    champion = str(alias_version("promo-dpo", "champion").version)
    assert champion == ("2" if decision["decision"] == "promoted" else "1")
    assert str(alias_version("promo-dpo", "challenger").version) == "2"
    metrics = MlflowClient().get_run(second["parent_run_id"]).data.metrics
    assert metrics["promotion.delta"] == pytest.approx(decision["delta"])
    report = open(second["report"]).read()
    assert "## Promotion" in report and decision["decision"] in report
