"""Your own preference data (`dpo.data`): TRL's preference shapes and UltraFeedback-like scored rows, bad
rows named before any model loads, offline DPO on it alone or mixed with the on-policy pairs."""

import hashlib
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import ConfigError, load_config
from alignflow.data.preferences import load_preference_rows
from alignflow.data.records import DataError
from tasks.load_data import preflight
from tests.conftest import SMOKE

SKY = [{"role": "user", "content": "What color is the sky?"}]


def write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_trl_preference_shapes_become_the_same_pairs(tmp_path):
    shapes = {
        "explicit_plain": {"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."},
        "explicit_conversational": {"prompt": SKY, "chosen": [{"role": "assistant", "content": "Blue."}],
                                    "rejected": [{"role": "assistant", "content": "Green."}]},
        "implicit_conversational": {"chosen": SKY + [{"role": "assistant", "content": "Blue."}],
                                    "rejected": SKY + [{"role": "assistant", "content": "Green."}]},
    }
    for name, row in shapes.items():
        pairs, ties = load_preference_rows(write(tmp_path / f"{name}.jsonl", [row]))
        assert ties == 0
        assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == (
            SKY, [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Green."}]), name
    # an implicit plain prompt is split off by TRL's own rule (the longest common prefix)
    implicit = {"chosen": "Sky color? It is blue.", "rejected": "Sky color? It is green."}
    pairs, _ = load_preference_rows(write(tmp_path / "implicit_plain.jsonl", [implicit]))
    assert pairs[0]["prompt"][0]["content"] == "Sky color? It is"
    assert pairs[0]["chosen"][0]["content"].strip() == "blue."


def test_scored_rows_are_binarized_best_against_a_random_lower_one_and_ties_dropped(tmp_path):
    rows = [{"instruction": f"Q{i}", "completions": [{"response": "best", "overall_score": 9},
                                                     {"response": "mid", "overall_score": 5},
                                                     {"response": "low", "overall_score": 1},
                                                     {"response": "also best", "overall_score": 9.5}]}
            for i in range(40)]
    rows.append({"prompt": "tie", "responses": ["a", "b"], "scores": [3, 3]})
    rows.append({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 7, 2]})
    pairs, ties = load_preference_rows(write(tmp_path / "uf.jsonl", rows), seed=0)
    assert ties == 1 and len(pairs) == 41
    assert {p["chosen"][0]["content"] for p in pairs[:40]} == {"also best"}
    rejected = [p["rejected"][0]["content"] for p in pairs[:40]]
    assert set(rejected) == {"best", "mid", "low"}  # a random lower one, not always the worst
    assert pairs[0]["margin"] == pytest.approx(9.5 - {"best": 9, "mid": 5, "low": 1}[rejected[0]])
    assert pairs[-1]["chosen"][0]["content"] == "b" and pairs[-1]["prompt"] == [{"role": "user", "content": "Q"}]
    again, _ = load_preference_rows(write(tmp_path / "uf.jsonl", rows), seed=0)
    assert again == pairs  # seeded


@pytest.mark.parametrize("rows, row, field, problem", [
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}], 2, None, "unrecognised"),
    ([{"prompt": "q", "chosen": "a", "rejected": 3}], 1, "rejected", "expected a string"),
    ([{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}], 1, "chosen", "assistant"),
    ([{"instruction": "q", "completions": [{"response": "a", "overall_score": 1},
                                           {"response": "b", "overall_score": float("nan")}]}],
     1, "completions[1].overall_score", "finite number"),
    ([{"instruction": "q", "completions": [{"response": "a", "overall_score": 1}, {"text": "b"}]}],
     1, "completions[1]", "a score"),
    ([{"prompt": "q", "responses": ["a", "b"], "scores": [1]}], 1, "scores", "one score per answer"),
    ([{"chosen": "Blue.", "rejected": "Green."}], 1, "prompt", "no prompt"),
    ([{"prompt": "q", "responses": ["a", "b"], "scores": [2, 2]}], None, None, "all 1 rows are ties"),
])
def test_a_bad_preference_row_is_named(tmp_path, rows, row, field, problem):
    path = write(tmp_path / "prefs.jsonl", rows)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with pytest.raises(DataError, match=problem) as err:
        load_preference_rows(path)
    assert (err.value.source, err.value.row, err.value.field) == (path, row, field)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest  # only read


def test_preference_data_is_checked_before_any_model_loads_and_its_config_is_consistent(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": None}])
    config = load_config(SMOKE, [f"dpo.data.path={bad}"])
    with pytest.raises(DataError, match="row 1: field 'rejected'"):
        preflight(config, "cpu")
    good = write(tmp_path / "good.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    found = preflight(load_config(SMOKE, [f"dpo.data.path={good}"]), "cpu")
    assert "prompts" not in found and found["preference"][1]["rows"] == 1  # nothing will be sampled
    assert "prompts" in preflight(load_config(SMOKE, [f"dpo.data.path={good}", "dpo.mix=true"]), "cpu")
    with pytest.raises(ConfigError, match="set dpo.data too"):
        load_config(SMOKE, ["dpo.mix=true"])
    with pytest.raises(ConfigError, match="rounds > 1"):
        load_config(SMOKE, [f"dpo.data.path={good}", "dpo.rounds=2"])


def own_pairs(rows: list[dict], path: Path) -> str:
    """Pairs a user might bring: the reference answer against the same answer rambling on."""
    return write(path, [{"prompt": r["prompt"], "chosen": r["completion"],
                         "rejected": [{"role": "assistant", "content": r["completion"][0]["content"] + " and more"}]}
                        for r in rows])


def stage_runs(results: dict) -> dict:
    client = MlflowClient()
    parent = client.get_run(results["parent_run_id"])
    return {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{results['parent_run_id']}'")}


@pytest.mark.slow
def test_offline_dpo_on_your_own_pairs_then_mixed_with_on_policy_pairs(prefect_server, smoke_data, tmp_path):
    from flows.pipeline import align

    data = own_pairs(smoke_data["prompts"], tmp_path / "mine.jsonl")
    from flows.stage import align_stage

    common = [f"output_dir={tmp_path / 'out'}", "experiment=own-pairs", f"dpo.data.path={data}", "eval.pass_k=0",
              "registry.enabled=false", "dpo.baselines=[rft]"]
    offline = align(load_config(SMOKE, common))
    runs = stage_runs(offline)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert "sample" not in runs and "rank" not in runs  # nothing sampled or ranked
    assert runs["load_data"].data.metrics["preference.rows"] == len(smoke_data["prompts"])
    dpo = runs["dpo"]
    client = MlflowClient()
    history = [m.value for m in client.get_metric_history(dpo.info.run_id, "rewards/margins")]
    assert history and history[-1] > 0  # it learned to prefer the user's chosen answers
    inputs = {d.dataset.name: d.dataset for d in dpo.inputs.dataset_inputs}
    assert "pairs" in inputs and runs["rft"].info.status == "FINISHED"  # the baseline trained on them too
    # one stage rerun by hand on that run's outputs: the pairs are found where the run kept them
    rerun = align_stage("dpo", offline["parent_run_id"], overrides=["dpo.trainer.beta=0.3"])
    assert rerun["output"]["uri"].startswith("runs:/")

    runs = stage_runs(align(load_config(SMOKE, common + ["dpo.mix=true"])))
    rank = runs["rank"].data.metrics
    assert rank["data_pairs"] == len(smoke_data["prompts"]) and rank["sampled_pairs"] > 0
    assert rank["pairs"] == rank["data_pairs"] + rank["sampled_pairs"]
    assert runs["dpo"].info.status == "FINISHED"
