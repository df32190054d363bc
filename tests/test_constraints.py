"""Verifiable constraints: every checker both ways, the loose reading, IFEval's file shape with its errors,
the constraints ranker's partial credit, and the embedded suite's honest splits."""

from __future__ import annotations

import json
import random

import pytest

from alignflow.constraints import REGISTRY, Constraint, ConstraintError, build, followed, parse
from alignflow.data.instructions import load_rows
from alignflow.data.records import DataError
from alignflow.rankers.constraints import Constraints
from alignflow.stats import constraint_metrics, correctness

# id -> (kwargs, answers that meet it, answers that do not)
CASES = {
    "change_case:english_lowercase": ({}, ["all of this is lower case."], ["This starts with a capital."]),
    "change_case:english_capital": ({}, ["THE WHOLE THING, SHOUTED."], ["MOSTLY SHOUTED, but not all."]),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"},
                                           ["The SUN and the MOON."], ["Only the SUN is loud."]),
    "punctuation:no_comma": ({}, ["No commas here at all."], ["Well, one comma."]),
    "length_constraints:number_words": ({"num_words": 5, "relation": "less than"}, ["Four words right here."],
                                        ["These are five words now."]),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "at least"},
                                            ["One sentence. Two sentences."], ["Only Dr. Smith came here."]),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, ["First part.\n***\nSecond part."],
                                             ["First part.\n***\n\n***\nSecond part.", "One part only."]),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        ["It rains.\n\nHowever, we walk."], ["It rains.\n\nWe walk, however.", "However, one paragraph."]),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, ["Intro:\n* one\n- two"],
                                              ["* one\n* two\n* three", "**bold** only"]),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            ["Section 1\nA.\nSection 2\nB."], ["Section 1\nOnly one."]),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, ["A *first* and **second** mark."],
                                                      ["Only *one* here, and ** ** an empty one."]),
    "detectable_format:title": ({}, ["<<A Day Out>>\nWe went."], ["<< >> no title", "<<broken\ntitle>>"]),
    "detectable_format:json_format": ({}, ['```json\n{"a": 1}\n```', '{"answer": "x"}'], ["{'a': 1}", "a: 1"]),
    "detectable_format:constrained_response": ({}, ["Hmm. My answer is maybe."], ["My answer is perhaps."]),
    "combination:two_responses": ({}, ["First one.\n******\nSecond one."],
                                  ["Same.\n******\nSame.", "A\n******\nB\n******\nC"]),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write about tea."}, ["write about tea. Tea is hot."],
                                  ["Tea is hot. Write about tea."]),
    "keywords:existence": ({"keywords": ["tea", "cup"]}, ["A cup of TEA."], ["A cup of coffee."]),
    "keywords:forbidden_words": ({"forbidden_words": ["very"]}, ["Every day is fine."], ["It is Very fine."]),
    "keywords:frequency": ({"keyword": "rain", "frequency": 2, "relation": "at least"}, ["Rain, more rain."],
                           ["Rain once."]),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "less than"},
                                  ["A zebra."], ["Zany zebras."]),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, ['Done. Any other questions?"'],
                             ["Any other questions? Done."]),
    "startend:start_checker": ({"start_phrase": "Sure."}, ["sure. Here it is."], ["Here it is. Sure."]),
    "startend:quotation": ({}, ['"All quoted."'], ['"Half quoted.', '"']),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, ["Bye.\n\nP.S. see you"],
                                      ["Bye. PS see you"]),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, ["Dear [name], at [place]."],
                                               ["Dear [name], at home."]),
}


def test_every_type_has_a_case_and_there_are_at_least_fifteen():
    assert set(CASES) == set(REGISTRY)
    assert len(REGISTRY) >= 15


@pytest.mark.parametrize("type_id", sorted(CASES))
def test_checker_passes_and_fails(type_id):
    kwargs, good, bad = CASES[type_id]
    constraint = build(type_id, kwargs)
    for answer in good:
        assert constraint.check(answer), (type_id, answer)
    for answer in bad:
        assert not constraint.check(answer), (type_id, answer)


@pytest.mark.parametrize("type_id", sorted(t for t in CASES if REGISTRY[t].rewrite is not Constraint.rewrite))
def test_a_rewrite_meets_its_constraint(type_id):
    """Each type's rewrite of a plain answer meets the drawn constraint (where the type has a rewrite)."""
    plain = ("Tea is a warm drink that many people enjoy. It comes from the leaves of a plant. People drink it in "
             "the morning and the evening. Some like it very strong and others like it with milk. It can be also "
             "very calming after a long day.")
    cls = REGISTRY[type_id]
    for seed in range(10):  # a draw whose rewrite applies (an `at least` length cannot be cut to)
        rng = random.Random(seed)
        constraint = cls(prompt_to_repeat="Write about tea.") if "prompt_to_repeat" in cls.model_fields \
            else cls.draw(rng, plain)
        rewritten = constraint.rewrite(plain, rng)
        if rewritten is not None:
            break
    assert rewritten is not None and constraint.check(rewritten), rewritten


def test_loose_reading_forgives_a_first_line_and_markdown():
    lowercase = build("change_case:english_lowercase", {})
    answer = "Sure! Here it is:\nall in lower case now."
    assert followed([lowercase], answer) == [False]
    assert followed([lowercase], answer, loose=True) == [True]
    quoted = build("startend:quotation", {})
    assert followed([quoted], '**"quoted"**', loose=True) == [True]


def test_ifeval_nulls_are_ignored_and_bad_kwargs_named():
    # IFEval's files give every kwarg of every type, null where unused
    assert build("punctuation:no_comma", {"num_words": None, "keywords": None}).check("no comma")
    with pytest.raises(ConstraintError, match="num_words") as err:
        build("length_constraints:number_words", {"num_words": "many", "relation": "less than"})
    assert err.value.field == "kwargs"
    with pytest.raises(ConstraintError, match="relation"):
        build("length_constraints:number_words", {"num_words": 3, "relation": "about"})
    with pytest.raises(ConstraintError, match="comma: not an argument"):
        build("punctuation:no_comma", {"comma": 1})
    with pytest.raises(ConstraintError, match="language detector") as err:
        build("language:response_language", {"language": "fr"})
    assert err.value.field == "instruction_id_list"


def _ifeval(tmp_path, rows) -> str:
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"key": 1, "prompt": "Write about tea without commas.", "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}]}


def test_ifeval_file_converts_with_its_constraints(tmp_path):
    rows = load_rows(_ifeval(tmp_path, [GOOD, GOOD | {"response": "Tea is nice"}]), require_reference=False)
    assert rows[0]["constraints"] == [{"id": "punctuation:no_comma", "kwargs": {}}]
    assert rows[0]["completion"] == [] and rows[1]["completion"][0]["content"] == "Tea is nice"
    # constraints stand in for a reference answer where a checker judges (evaluation)
    assert load_rows(_ifeval(tmp_path, [GOOD]), constraints_suffice=True)[0]["prompt"][0]["content"] == GOOD["prompt"]
    with pytest.raises(DataError, match="no reference answer"):
        load_rows(_ifeval(tmp_path, [GOOD]))  # SFT needs the demonstration itself


@pytest.mark.parametrize("bad, field, message", [
    ({"instruction_id_list": ["punctuation:no_commas"]}, "instruction_id_list", "unknown instruction id"),
    ({"instruction_id_list": []}, "instruction_id_list", "non-empty list"),
    ({"kwargs": [{}, {}]}, "kwargs", "one per instruction id"),
    ({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": "tea"}]}, "kwargs", "keywords"),
    ({"response": "Tea, hot."}, "response", "does not meet its own constraints"),
])
def test_bad_ifeval_row_names_file_row_and_field(tmp_path, bad, field, message):
    path = _ifeval(tmp_path, [GOOD, GOOD | bad])
    with pytest.raises(DataError, match=message) as err:
        load_rows(path, require_reference=False)
    assert (err.value.source, err.value.row, err.value.field) == (path, 2, field)


def test_the_constraints_ranker_gives_partial_credit():
    specs = [build("punctuation:no_comma", {}).spec(), build("change_case:english_lowercase", {}).spec()]
    prompt = [[{"role": "user", "content": "Write."}]]
    ranker = Constraints().open("cpu")
    assert ranker.score(prompt * 3, ["all fine here", "all, fine", "Neither, fine"], [specs] * 3) == [1.0, 0.5, 0.0]
    strict = Constraints(credit="strict")
    assert strict.score(prompt * 2, ["all fine here", "all, fine"], [specs] * 2) == [1.0, 0.0]
    reward = ranker.reward_function()
    assert reward([[{"role": "assistant", "content": "all, fine"}]], constraints=[specs]) == [0.5]
    with pytest.raises(ValueError, match="prompt 1"):
        ranker.score(prompt, ["x"], ["a reference answer"])


def test_prompt_and_instruction_level_accuracy():
    rows = [{"prompt": [{"role": "user", "content": "p"}], "completion": [], "task": "seen",
             "constraints": [build("punctuation:no_comma", {}).spec(),
                             build("change_case:english_lowercase", {}).spec()]},
            {"prompt": [{"role": "user", "content": "p"}], "completion": [], "task": "held_out",
             "constraints": [build("startend:quotation", {}).spec()]}]
    answers = [{"text": "all fine, mostly"}, {"text": 'Note:\n"quoted"'}]
    assert correctness(rows, answers).tolist() == [0.0, 0.0]
    metrics = constraint_metrics(rows, answers)
    assert metrics["instruction_accuracy"] == pytest.approx(1 / 3)
    assert metrics["instruction_accuracy_loose"] == pytest.approx(2 / 3)  # the quote, without its first line
    assert metrics["accuracy_loose"] == 0.5 and metrics["accuracy_loose.held_out"] == 1.0
    assert metrics["instruction_accuracy.punctuation.no_comma"] == 0.0
    assert metrics["instruction_accuracy.change_case.english_lowercase"] == 1.0


def test_embedded_suite_holds_types_and_topics_out():
    from alignflow.constraints import HELD_OUT_TYPES
    from alignflow.embedded.constraints import EVAL_TOPICS, TRAIN_TOPICS, make_splits

    splits = make_splits({"sft": 60, "prompts": 30, "eval": 30, "held_out": 20}, seed=3)
    assert [len(splits[s]) for s in ("sft", "prompts", "eval")] == [60, 30, 50]
    for split in ("sft", "prompts"):
        for row in splits[split]:
            assert not set(row["instruction_id_list"]) & set(HELD_OUT_TYPES)
            assert any(t in row["prompt"] for t in TRAIN_TOPICS) and not any(
                f"about {t}." in row["prompt"] for t in EVAL_TOPICS)
    held = [r for r in splits["eval"] if r["task"] == "held_out"]
    assert len(held) == 20 and all(r["instruction_id_list"][0] in HELD_OUT_TYPES for r in held)
    for row in splits["sft"]:  # every demonstration meets its constraints, as the reader checks
        assert all(followed(parse([{"id": i, "kwargs": k} for i, k in zip(row["instruction_id_list"], row["kwargs"])]),
                            row["response"]))
    assert make_splits({"sft": 60, "prompts": 30, "eval": 30, "held_out": 20}, seed=3) == splits  # deterministic


def test_preflight_checks_the_prompts_the_constraints_ranker_needs(tmp_path):
    """Before any model loads: prompts without constraints are refused for the constraints ranker, naming the
    row; IFEval-shaped eval rows need no reference answer; the embedded constraint splits convert."""
    from alignflow.config import load_config
    from tasks.load_data import preflight
    from tests.conftest import SMOKE

    common = [f"output_dir={tmp_path}", "rank.ranker=constraints"]
    with pytest.raises(DataError, match="needed by the constraints ranker") as err:
        preflight(load_config(SMOKE, common), "cpu")
    assert (err.value.row, err.value.field) == (1, "instruction_id_list")
    suite = ["sft.data.path=embedded:ifeval-sft", "sample.prompts.path=embedded:ifeval-prompts",
             "eval.data.path=embedded:ifeval-eval", "embedded.constraints.sft_examples=20",
             "embedded.constraints.prompt_examples=6", "embedded.constraints.eval_examples=6",
             "embedded.constraints.held_out_examples=3"]
    converted = preflight(load_config(SMOKE, common + suite), "cpu")
    assert {name: stats["rows"] for name, (_, stats) in converted.items()} == {"sft": 20, "prompts": 6, "eval": 9}
    evals = converted["eval"][1]["sample"]
    assert all(r["constraints"] and r["completion"] == [] for r in evals)
    assert {r["task"] for r in evals} == {"seen", "held_out"}
    with pytest.raises(Exception, match="both seen and held out"):
        load_config(SMOKE, common + ["embedded.constraints.types=[punctuation:no_comma]",
                                     "embedded.constraints.held_out_types=[punctuation:no_comma]"])


def test_rank_agreement_skips_a_reference_ranker_on_constraint_prompts():
    """rank.agree_with defaults to the verifier: prompts with constraints have no reference answer for it."""
    from alignflow.config import RankSection
    from tasks.rank import agreements, score_rows

    specs = [build("punctuation:no_comma", {}).spec()]
    rows = [{"prompt": [{"role": "user", "content": "Write."}], "reference": specs, "candidates": ["a, b", "a b"]}]
    cfg = RankSection(ranker="constraints")
    rewards = score_rows(cfg.ranker.open("cpu"), rows)
    assert rewards == [[0.0, 1.0]]
    assert agreements(cfg, rows, rewards, "cpu") == {}  # the verifier skipped, not failed
