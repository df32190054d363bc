"""The MLflow Model Registry: registration, the challenger alias, and the champion rule."""

import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from alignflow.config import RegistrySection, load_config
from alignflow.tracking.model_registry import alias_version
from flows.pipeline import align
from tasks.promote import promote
from tests.conftest import SMOKE
from tests.test_stages import base_ref, dataset_ref

pytestmark = pytest.mark.slow


HEALTHY = {"eos_rate": 1.0, "mean_tokens": 4.0, "repetition_rate": 0.0}


def models(sft, challenger) -> dict:
    """The promote stage's `models` input: every evaluated model by label (the challenger is dpo's)."""
    return {"sft": sft, "dpo": challenger}


def evaluated(correct: list[float], dpo: dict | None = None) -> dict:
    """An evaluation's results as promote reads them: the challenger's per-prompt correctness, and the
    metrics of the challenger and its SFT model (healthy unless given)."""
    return {"correct": {"dpo": correct}, "metrics": {"sft": HEALTHY, "dpo": dpo or HEALTHY}}


def measured(texts: list[str], ended: bool, tokens: int) -> dict:
    """A model's metrics as the evaluate stage measures them from its answers (alignflow.health)."""
    from alignflow.health import answer_health

    given = [{"text": t, "ended": ended, "tokens": tokens} for t in texts]
    return {"eos_rate": float(ended), **answer_health(given)}


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

    first = promote.fn(cfg, "reg", models(sft_model, variants[0]), data, smoke_config.eval,
                       evaluated([0.0] * n), run_ctx)
    assert first["decision"] == "first champion"
    assert str(alias_version("reg-dpo", "champion").version) == str(alias_version("reg-dpo", "challenger").version) == "1"
    assert client.get_model_version("reg-sft", "1").tags["alignflow.digest"] == sft_model.digest

    # the champion (the untuned tiny model) answers nothing correctly: a challenger right everywhere clears it
    second = promote.fn(cfg, "reg", models(sft_model, variants[1]), data, smoke_config.eval,
                        evaluated([1.0] * n), run_ctx)
    assert second["decision"] == "promoted" and second["delta_ci95_low"] > 0
    assert second["champion_accuracy"] == 0.0 and second["previous_champion_version"] == 1
    assert str(alias_version("reg-dpo", "champion").version) == "2"

    # one no better than the champion stays challenger
    third = promote.fn(cfg, "reg", models(sft_model, variants[2]), data, smoke_config.eval,
                       evaluated([0.0] * n), run_ctx)
    assert third["decision"] == "kept champion" and third["delta_ci95_low"] <= 0
    assert str(alias_version("reg-dpo", "champion").version) == "2"
    assert str(alias_version("reg-dpo", "challenger").version) == "3"
    # the SFT model's content did not change: no new version
    assert [str(v.version) for v in client.search_model_versions("name = 'reg-sft'")] == ["1"]
    parent = client.get_run(run_ctx.parent_run_id)
    assert parent.data.tags["alignflow.promotion"] == "kept champion"

    # the champion alias holds the promoted variant's directory, and loaded back through MLflow it is that
    # model: predict answers as greedy decoding of it does (64 new tokens), and since the untuned model's
    # answers are blank, its next-token logits are what tell it from any other model
    from alignflow.models.generate import generate
    from alignflow.models.loading import load_causal_lm, load_tokenizer
    from alignflow.tracking.model_registry import version_model_dir
    from tests.test_lora_stack import next_token_logits

    assert open(f"{version_model_dir(alias_version('reg-dpo', 'champion'))}/variant.txt").read() == "1"
    prompts = [r["prompt"] for r in eval_rows if len(r["prompt"]) == 1][:4]
    champion = mlflow.pyfunc.load_model("models:/reg-dpo@champion")
    answers = champion.predict([p[-1]["content"] for p in prompts])
    model, tokenizer = load_causal_lm(variants[1].local_path, "cpu"), load_tokenizer(variants[1].local_path)
    assert answers == [a[0]["text"] for a in generate(model, tokenizer, prompts, max_new_tokens=64)]
    loaded = champion.unwrap_python_model()
    torch.testing.assert_close(next_token_logits(loaded.model, loaded.tokenizer, prompts),
                               next_token_logits(model, tokenizer, prompts))


def test_refused_challengers_are_registered_but_never_champion(smoke_config, tiny_model_path, smoke_data, run_ctx,
                                                               tmp_path):
    """A challenger that repeats one token, then one that answers at twice its SFT model's length, is each
    registered and refused with its named reason, the first champion included; a healthy one is promoted."""
    eval_rows = smoke_data["eval"]
    data = dataset_ref(eval_rows, tmp_path / "eval.jsonl")
    n, client = len(eval_rows), MlflowClient()
    variants = []
    for i in range(3):
        copy = tmp_path / f"model{i}"
        shutil.copytree(tiny_model_path, copy)
        (copy / "variant.txt").write_text(str(i))
        variants.append(base_ref(str(copy)))
    sft_model = base_ref(tiny_model_path)
    sft = measured(["a fox and a bee"] * n, ended=True, tokens=16)
    collapsed = measured(["2" * 32] * n, ended=False, tokens=32)
    longer = measured(["a fox and a bee and a fox"] * n, ended=True, tokens=32)
    cases = [(collapsed, ["degenerate: EOS rate 0.000", "degenerate: repetition rate 1.000",
                          "degenerate: answers 2.00x as long"]),
             (longer, ["degenerate: answers 2.00x as long"])]
    for version, (metrics, named) in enumerate(cases, start=1):
        evaluation = {"correct": {"dpo": [0.0] * n}, "metrics": {"sft": sft, "dpo": metrics}}
        decision = promote.fn(RegistrySection(), "guard", models(sft_model, variants[version - 1]), data,
                              smoke_config.eval, evaluation, run_ctx)
        assert decision["decision"] == "refused" and "champion_version" not in decision
        reasons = decision["reasons"]
        assert len(reasons) == len(named) and all(r.startswith(x) for r, x in zip(reasons, named)), reasons
        assert alias_version("guard-dpo", "champion") is None
        assert str(alias_version("guard-dpo", "challenger").version) == str(version)  # registered all the same
        tags = client.get_model_version("guard-dpo", str(version)).tags
        assert tags["alignflow.promotion"] == "refused"
        assert tags["alignflow.promotion_reason"] == "\n".join(decision["reasons"])
        parent = client.get_run(run_ctx.parent_run_id).data
        assert parent.tags["alignflow.promotion_reason"] == tags["alignflow.promotion_reason"]
        assert parent.metrics["promotion.promoted"] == 0.0
    healthy = {"correct": {"dpo": [0.0] * n}, "metrics": {"sft": sft, "dpo": sft}}
    decision = promote.fn(RegistrySection(), "guard", models(sft_model, variants[2]), data, smoke_config.eval, healthy,
                          run_ctx)
    assert decision["decision"] == "first champion"
    assert str(alias_version("guard-dpo", "champion").version) == "3"
    assert "alignflow.promotion_reason" not in client.get_model_version("guard-dpo", "3").tags


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


def prefect_log(flow_run_id: str, contains: str, timeout: float = 60) -> list[str]:
    """The flow run's log lines (read back through Prefect's API) holding `contains`; waits, bounded, for
    Prefect's log worker to have sent them."""
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    deadline = time.monotonic() + timeout
    while True:
        lines = [log.message for log in asyncio.run(read()) if contains in log.message]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(1)


def test_a_collapsing_dpo_is_watched_refused_and_a_promote_rerun_decides_by_the_same_rules(prefect_server, tmp_path):
    """A learning rate far too high for the tiny model: the chosen log-prob falls while DPO trains and the
    policy collapses to one repeated token. The log and the report warn; promotion registers it and refuses
    it (the first champion of its name); `alignflow stage promote --from-run` decides again by the same rules,
    with the limits of its own config."""
    from flows.stage import align_stage

    overrides = [f"output_dir={tmp_path / 'out'}", "experiment=collapse", "eval.pass_k=0",
                 "dpo.trainer.learning_rate=0.05", "dpo.trainer.num_train_epochs=8", "dpo.trainer.logging_steps=1"]
    results = align(load_config(SMOKE, overrides))
    client = MlflowClient()
    parent = client.get_run(results["parent_run_id"])
    dpo = results["metrics"]["dpo"]
    assert dpo["repetition_rate"] - results["metrics"]["sft"]["repetition_rate"] > 0.25, dpo

    dpo_run = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'dpo'")[0]
    assert dpo_run.data.metrics["watch.chosen_logp_shift_per_token"] < -1.0
    warning = "the chosen answers' log-prob fell over training"
    assert warning in dpo_run.data.tags["alignflow.warnings"]
    assert prefect_log(parent.data.tags["prefect.flow_run_id"], warning)
    report = open(results["report"]).read()
    assert f"⚠ **dpo**: {warning}" in report

    decision = results["promotion"]
    assert decision["decision"] == "refused" and alias_version("collapse-dpo", "champion") is None
    assert any(r.startswith("degenerate: repetition rate") for r in decision["reasons"]), decision
    assert "**refused**" in report and "degenerate: repetition rate" in report
    assert parent.data.tags["alignflow.promotion"] == "refused"

    again = align_stage("promote", results["parent_run_id"])
    assert again["decision"] == "refused" and again["reasons"] == decision["reasons"]
    assert alias_version("collapse-dpo", "champion") is None
    loose = ["registry.max_repetition_rise=1", "registry.max_repetition_rate=1", "registry.max_eos_rate_drop=1",
             "registry.max_length_ratio=100", "registry.max_loss_vs_sft=1"]
    rerun = align_stage("promote", results["parent_run_id"], overrides=loose)
    assert rerun["decision"] == "first champion"
    assert str(alias_version("collapse-dpo", "champion").version) == str(decision["challenger_version"])
    tags = client.get_model_version("collapse-dpo", str(decision["challenger_version"])).tags
    assert tags["alignflow.promotion"] == "first champion" and "alignflow.promotion_reason" not in tags
    assert client.get_run(rerun["parent_run_id"]).data.tags["alignflow.rerun_of"] == results["parent_run_id"]
