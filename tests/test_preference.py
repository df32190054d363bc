"""The preference levers and the evaluation statistics, without training anything."""

import numpy as np
import pytest

from alignflow.config import ConfigError, load_config
from alignflow.rankers.pairs import build_pairs
from alignflow.stats import (answer_flaws, bootstrap_ci, flaw_of, flaw_shares, length_controlled_win_rate,
                             outcomes_from_scores, pass_at_k, versus)
from tasks.dpo import without_sft_term
from tasks.evaluate import differing_prompt, report_prompts
from tasks.rft import sft_fields
from tasks.stages import parse_round_label, round_label, stage_name
from tests.conftest import SMOKE


def _row(candidates):
    return {"prompt": [{"role": "user", "content": "q"}], "candidates": candidates, "task": "t", "reference": "a"}


def test_best_random_pairs_the_best_with_some_lower_candidate():
    rows = [_row(["a", "b", "c", "d"])] * 200
    scores = [[1.0, 0.4, 0.2, 0.0]] * 200
    worst = build_pairs(rows, scores, strategy="best_worst")[0]
    rand, ties = build_pairs(rows, scores, strategy="best_random", seed=1)
    assert {p["rejected"][0]["content"] for p in worst} == {"d"}
    assert {p["rejected"][0]["content"] for p in rand} == {"b", "c", "d"} and ties == 0
    assert all(p["chosen"][0]["content"] == "a" for p in rand)
    # with a margin threshold only candidates clearly below the best may be rejected
    narrow, _ = build_pairs(rows, scores, min_margin=0.7, strategy="best_random", seed=1)
    assert {p["rejected"][0]["content"] for p in narrow} == {"c", "d"}


def test_baseline_variants_derive_their_trainer_arguments():
    args = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1, "learning_rate": 1e-4,
            "num_train_epochs": 2, "precompute_ref_log_probs": True}
    plain = without_sft_term(args)
    assert plain["loss_type"] == ["sigmoid"] and plain["loss_weights"] == [1.0] and plain["beta"] == 0.1
    rft = sft_fields(args)
    assert rft == {"learning_rate": 1e-4, "num_train_epochs": 2}  # SFTConfig fields only, no DPO loss


def test_rounds_and_baselines_are_config_options():
    config = load_config(SMOKE, ["dpo.rounds=3", "dpo.baselines=[rft, dpo_no_sft]", "rank.pairs=best_random"])
    assert config.dpo.rounds == 3 and config.dpo.baselines == ["rft", "dpo_no_sft"]
    with pytest.raises(ConfigError, match="embedded.tasks"):
        load_config(SMOKE, ["embedded.tasks=[juggling]"])
    assert [stage_name("dpo", "dpo", r, 3) for r in (1, 2)] == ["dpo.round1", "dpo.round2"]
    assert stage_name("sample", "rft", 2, 3) == "sample.rft.round2" and stage_name("dpo", "dpo", 1, 1) == "dpo"
    # the evaluation's labels of each round's model, named in one place and read back by the report
    assert [round_label("dpo", r, 3) for r in (1, 2, 3)] == ["dpo_r1", "dpo_r2", "dpo"]
    assert parse_round_label("rft_r2") == ("rft", 2) and parse_round_label("dpo") is None


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    small, large = (rng.random(n) < 0.6 for n in (50, 2000))
    lo_s, hi_s = bootstrap_ci(small.astype(float), 1000, seed=0)
    lo_l, hi_l = bootstrap_ci(large.astype(float), 1000, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_win_rate_and_paired_difference_against_sft():
    sft = np.array([1, 0, 0, 1, 0], dtype=float)
    dpo = np.array([1, 1, 0, 1, 1], dtype=float)
    outcomes = outcomes_from_scores([1.0, 1.0, 0.2, 1.0, 1.0], [1.0, 0.3, 0.4, 1.0, 0.1])
    result = versus(dpo, sft, outcomes, 500, seed=0)
    assert (result["wins_vs_sft"], result["losses_vs_sft"], result["ties_vs_sft"]) == (2, 1, 2)
    assert result["win_rate_vs_sft"] == pytest.approx((2 + 1) / 5)
    assert result["delta_vs_sft"] == pytest.approx(0.4)
    assert 0 <= result["delta_vs_sft_ci95_low"] <= 0.4 <= result["delta_vs_sft_ci95_high"]
    assert result["win_rate_vs_sft_ci95_low"] <= 0.6 <= result["win_rate_vs_sft_ci95_high"]


def test_length_controlled_win_rate_removes_a_judge_s_length_preference():
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 10, 4000)  # answer-length differences, words
    # a judge that prefers the longer answer; at equal length the two models are even
    biased = (rng.random(4000) < 1 / (1 + np.exp(-2 * np.tanh(diff / 10)))).astype(float)
    longer = diff + 8  # the same judge, with the model's answers 8 words longer
    biased_longer = (rng.random(4000) < 1 / (1 + np.exp(-2 * np.tanh(longer / 10)))).astype(float)
    assert length_controlled_win_rate(biased, diff) == pytest.approx(0.5, abs=0.04)
    assert biased_longer.mean() > 0.6  # the raw win rate rewards the length...
    assert length_controlled_win_rate(biased_longer, longer) == pytest.approx(0.5, abs=0.04)  # ...the LC one not
    even = versus(None, None, [1.0, 0.0] * 50, 200, seed=0, length_diff=np.zeros(100))
    assert even["lc_win_rate_vs_sft"] == pytest.approx(0.5, abs=1e-6) and "delta_vs_sft" not in even


def test_pass_at_k_counts_a_prompt_once_if_any_sample_is_right():
    rows = [{"task": "a", "completion": [{"content": "x"}]}, {"task": "b", "completion": [{"content": "y"}]}]
    samples = [[{"text": "no"}, {"text": "x"}], [{"text": "no"}, {"text": "nope"}]]
    assert pass_at_k(rows, samples, 2) == {"pass_at_2": 0.5, "pass_at_2.a": 1.0, "pass_at_2.b": 0.0}


def test_report_prompts_are_a_seeded_draw_plus_one_where_sft_and_dpo_differ():
    rows = [{"task": "t"}] * 50
    shown = report_prompts(rows, 5, seed=0)
    assert len(set(shown)) == 5 and shown == report_prompts(rows, 5, seed=0) != report_prompts(rows, 5, seed=1)
    assert shown != [0, 1, 2, 3, 4] and report_prompts(rows[:3], 5, seed=0) == [0, 1, 2]
    same = [{"text": "a"}] * 50
    other = [{"text": "a"}] * 50
    other[7] = other[shown[0]] = {"text": "b"}
    assert differing_prompt({"sft": same, "dpo": other}, shown, seed=0) == 7  # not one already shown
    assert differing_prompt({"sft": same, "dpo": same}, shown, seed=0) is None
    assert differing_prompt({"sft": same}, shown, seed=0) is None


def test_answers_are_classified_by_flaw():
    cases = {("odd", "odd"): None, ("odd, because that", "odd"): "verbose", ("odd odd odd od", "odd"): "runon",
             ("even", "odd"): "wrong", ("12", "1"): "wrong", ("", "1"): "wrong", ("1.", "1"): "verbose",
             ("first first", "first"): "runon", ("yes no", "yes"): "verbose", (" odd ", "odd"): None}
    assert {case: flaw_of(*case) for case in cases} == cases
    rows = [{"task": t, "completion": [{"content": "odd"}]} for t in "aab"]
    shares = flaw_shares(rows, answer_flaws(rows, [{"text": "odd odd"}, {"text": "even"}, {"text": "odd"}]))
    assert shares["flaw_runon"] == pytest.approx(1 / 3) and shares["flaw_runon.a"] == 0.5
    assert shares["flaw_wrong.a"] == 0.5 and shares["flaw_verbose"] == 0.0 and shares["flaw_wrong.b"] == 0.0


def test_the_run_summary_shows_every_side_by_side_prompt_and_marks_the_differing_one():
    from flows.cli import _examples

    examples = [{"prompt": f"Even or odd?\n\n{n}", "task": "parity", "reference": "odd", "label": "random",
                 "answers": {"sft": "odd, because that is what", "dpo": "odd"}} for n in (3, 5)]
    examples.append({**examples[0], "prompt": "Even or odd?\n\n7", "label": "SFT and DPO differ"})
    lines = _examples(examples).strip().splitlines()
    assert lines[0].split() == ["prompt", "reference", "sft", "dpo"]
    assert [line.startswith("'Even or odd?") for line in lines[1:]] == [True, True, False, True]
    assert lines[3] == "-- SFT and DPO differ:" and "\\n\\n7" in lines[4] and "'odd, because" in lines[4]
    assert _examples([]) == ""
