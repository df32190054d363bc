"""The run report and `alignflow compare`, on real flow runs logged to a real `mlflow server`."""

import asyncio
import os
import sys
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import load_config
from flows.pipeline import align
from tasks.report import prefect_markdown
from tests.conftest import SMOKE, run_in_session

pytestmark = pytest.mark.slow
SECTIONS = ["## Models", "## Promotion", "## Preference training watch", "## Stage runs", "## Accuracy per task type",
            "## What the preference stage changed", "## Base-model selection", "## Preference pairs",
            "## Training curves", "## Same prompts, every model"]
PLOTS = ["accuracy_by_task.png", "flaws.png", "pair_margins.png", "sft_loss.png", "dpo_curves.png"]


@pytest.fixture(scope="module")
def two_runs(mlflow_server, prefect_server, tmp_path_factory):
    """The smoke flow twice against the server: as shipped, and with rounds, baselines, another SFT lr and
    a quarter of the SFT answers verbose."""
    out = tmp_path_factory.mktemp("runs")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        first = align(load_config(SMOKE, [f"output_dir={out}", "experiment=compare-me"]))
        second = align(load_config(SMOKE, [f"output_dir={out}", "experiment=compare-me", "dpo.rounds=2",
                                           "dpo.baselines=[rft, dpo_no_sft]", "sft.trainer.learning_rate=5e-3",
                                           "embedded.flaws.verbose=0.25"]))
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = previous or ""
    return first, second


@pytest.fixture
def server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow_server


def test_report_is_an_mlflow_artifact_matching_the_metrics(two_runs, server, tmp_path):
    results = two_runs[1]
    client = MlflowClient()
    run_id = results["parent_run_id"]
    files = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.md", *(f"report/{p}" for p in PLOTS)} <= files
    local = client.download_artifacts(run_id, "report", str(tmp_path))
    for plot in PLOTS:
        assert open(f"{local}/{plot}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(f"{local}/report.md").read()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    metrics = client.get_run(run_id).data.metrics
    stage_rows = {line.split("|")[1].strip(" *"): line for line in text.split("## Models")[1].split("##")[0]
                  .splitlines() if line.startswith("| **")}
    assert list(stage_rows) == ["base", "sft", "dpo_r1", "dpo", "dpo_no_sft", "rft"]
    for model, line in stage_rows.items():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == f"{metrics[f'{model}.accuracy']:.3f}"
        assert cells[2] == f"[{metrics[f'{model}.accuracy_ci95_low']:.3f}, {metrics[f'{model}.accuracy_ci95_high']:.3f}]"
        assert cells[3] == f"{metrics[f'{model}.pass_at_8']:.3f}"
        assert cells[5].startswith(f"{metrics[f'{model}.eos_rate']:.3f}")
        assert cells[6].startswith(f"{metrics[f'{model}.mean_tokens']:.1f}")
        assert cells[7].startswith(f"{metrics[f'{model}.repetition_rate']:.3f}")
        if model not in ("base", "sft"):  # each preference-trained model against its SFT model
            assert cells[5].endswith(f"({metrics[f'{model}.eos_rate_change_vs_sft']:+.3f})")
            assert cells[6].endswith(f"({metrics[f'{model}.length_ratio_vs_sft']:.2f}×)")
            assert cells[7].endswith(f"({metrics[f'{model}.repetition_rate_change_vs_sft']:+.3f})")
            assert cells[9].startswith(f"{metrics[f'{model}.win_rate_vs_sft']:.3f} [")
            assert cells[10] == f"{metrics[f'{model}.lc_win_rate_vs_sft']:.3f}"
    # one row per stage run, in the registry's stage order, rounds in run order
    runs = [line.split("|")[1].strip() for line in text.split("## Stage runs")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| stage ")]
    assert runs == ["load_data", "select_base", "sft",
                    "sample", "sample.round2", "sample.rft.round2", "sample.dpo_no_sft.round2",
                    "rank", "rank.round2", "rank.rft.round2", "rank.dpo_no_sft.round2",
                    "dpo.round1", "dpo.round2", "dpo_no_sft.round1", "dpo_no_sft.round2", "rft.round1", "rft.round2",
                    "evaluate", "promote"]
    examples = [line for line in text.split("## Same prompts, every model")[1].splitlines() if line.startswith("| ")]
    recorded = results["examples"]
    assert [e["label"] for e in recorded[:5]] == ["random"] * 5 and len(examples) == 1 + len(recorded)
    assert all(line.startswith(f"| {e['label']} | {e['task']} |") for line, e in zip(examples[1:], recorded))
    for e in recorded[5:]:  # at most one more: a prompt where SFT and DPO answer differently
        assert e["label"] == "SFT and DPO differ" and e["answers"]["sft"] != e["answers"]["dpo"]
    # every answer is exact or has exactly one flaw, and the table shows the metrics
    flaws = text.split("## What the preference stage changed")[1].split("##")[0]
    assert "The SFT demonstrations had 25% verbose answers" in flaws
    for model in ["sft", "dpo", "rft"]:
        shares = [metrics[f"{model}.{k}"] for k in ("accuracy", "flaw_wrong", "flaw_verbose", "flaw_runon")]
        assert sum(shares) == pytest.approx(1.0)
        assert f"| **{model}** | " + " | ".join(f"{v:.3f}" for v in shares) + " |" in flaws
    pairs = text.split("## Preference pairs")[1]
    assert "| rank | " in pairs and "| rank.round2 | " in pairs and "| rank.rft.round2 | " in pairs


def test_report_is_a_prefect_artifact_with_plots_served_by_mlflow(two_runs, server):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    results = two_runs[1]
    run = MlflowClient().get_run(results["parent_run_id"])
    flow_run_id = run.data.tags["prefect.flow_run_id"]

    async def artifacts():
        async with get_client() as prefect:
            return await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["alignflow-report"])))

    mine = [a for a in asyncio.run(artifacts()) if str(a.flow_run_id) == flow_run_id]
    assert len(mine) == 1 and mine[0].type == "markdown"
    report = open(results["report"]).read()
    assert mine[0].data == prefect_markdown(report, results["parent_run_id"])
    link = mine[0].data.split("![accuracy per task type](")[1].split(")")[0]
    assert link.startswith(server)
    assert urllib.request.urlopen(link, timeout=10).read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_command_rebuilds_the_same_report(two_runs, server, tmp_path):
    run_id = two_runs[1]["parent_run_id"]
    cli = run_in_session([sys.executable, "-m", "flows.cli", "report", run_id, "--out", str(tmp_path / "again")],
                         timeout=300, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": server})
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "again" / "report.md").read_text() == open(two_runs[1]["report"]).read()
    assert (tmp_path / "again" / "dpo_curves.png").stat().st_size > 1000


def test_compare_against_the_tracking_server(two_runs, server):
    first, second = (r["parent_run_id"] for r in two_runs)
    cli = run_in_session([sys.executable, "-m", "flows.cli", "--tracking-uri", server, "compare", first, second],
                         timeout=300, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    rows = {line.split()[0]: line.split()[1:] for line in cli.stdout.splitlines() if line.strip()}
    assert rows["run"] == [first[:12], second[:12]]
    assert rows["sft.trainer.learning_rate"] == ["0.003", "0.005"] and rows["dpo.rounds"] == ["1", "2"]
    assert "sample.temperature" not in rows  # equal values are not differences
    metrics = [MlflowClient().get_run(r).data.metrics for r in (first, second)]
    assert rows["dpo.accuracy"] == [f"{m['dpo.accuracy']:.3f}" for m in metrics]
    assert rows["rft.accuracy"] == ["–", f"{metrics[1]['rft.accuracy']:.3f}"]
    assert rows["dpo.repetition_rate"] == [f"{m['dpo.repetition_rate']:.3f}" for m in metrics]
    assert rows["dpo.mean_tokens"] == [f"{m['dpo.mean_tokens']:.3f}" for m in metrics]
    decisions = [MlflowClient().get_run(r).data.tags["alignflow.promotion"] for r in (first, second)]
    assert next(line for line in cli.stdout.splitlines() if line.startswith("promotion ")).split() == [
        "promotion", *" ".join(decisions).split()]
    latest = run_in_session([sys.executable, "-m", "flows.cli", "compare", "--experiment", "compare-me"],
                            timeout=300, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": server})
    assert latest.returncode == 0 and latest.stdout.splitlines()[0].split()[1:] == [first[:12], second[:12]]


def test_compare_on_the_local_store_and_unknown_experiment(mlflow_store):
    client = MlflowClient()
    exp = client.create_experiment("local")
    ids = []
    for lr, acc in (("0.001", 0.5), ("0.002", 0.75)):
        run = client.create_run(exp, run_name=f"lr{lr}")
        client.log_param(run.info.run_id, "dpo.trainer.learning_rate", lr)
        client.log_param(run.info.run_id, "seed", "0")
        client.log_metric(run.info.run_id, "dpo.accuracy", acc)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    cli = run_in_session([sys.executable, "-m", "flows.cli", "compare", "--experiment", "local"],
                         timeout=300, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    rows = {line.split()[0]: line.split()[1:] for line in cli.stdout.splitlines() if line.strip()}
    assert rows["dpo.trainer.learning_rate"] == ["0.001", "0.002"] and rows["dpo.accuracy"] == ["0.500", "0.750"]
    assert "seed" not in rows
    missing = run_in_session([sys.executable, "-m", "flows.cli", "compare", "--experiment", "nope"],
                             timeout=300, capture_output=True, text=True)
    assert missing.returncode == 2 and "nope" in missing.stderr
