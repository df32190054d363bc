import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow import embedded
from alignflow.config import EmbeddedSpec
from alignflow.embedded.suite import TASKS, make_splits
from alignflow.rankers.pairs import build_pairs
from alignflow.rankers.verifier import Verifier


def test_splits_are_disjoint_diverse_and_deterministic():
    sizes = {"sft": 600, "prompts": 60, "eval": 60}
    splits = make_splits(sizes, seed=3)
    keys = {name: {(r["task"], r["input"], r["output"]) for r in rows} for name, rows in splits.items()}
    assert all(len(keys[n]) == sizes[n] for n in sizes)
    assert not keys["sft"] & keys["eval"] and not keys["sft"] & keys["prompts"] and not keys["prompts"] & keys["eval"]
    assert {r["task"] for r in splits["eval"]} == set(TASKS) and len(TASKS) >= 6
    assert make_splits(sizes, seed=3) == splits
    assert all(set(r) == {"instruction", "input", "output", "task"} for r in splits["sft"])


def test_verifier_ranks_the_right_answer_first():
    row = {"prompt": [{"role": "user", "content": "Reverse the word.\n\nlemon"}], "reference": "nomel",
           "task": "reverse", "candidates": ["lemon", "nomel", "the word lemon is a fruit", "nomle"]}
    scores = Verifier().score([row["prompt"]] * 4, row["candidates"], [row["reference"]] * 4)
    assert max(range(4), key=scores.__getitem__) == 1 and scores[1] == 1.0
    assert scores[3] > scores[2]  # a near miss beats a ramble
    (pair,), ties = build_pairs([row], [scores])
    assert pair["chosen"][0]["content"] == "nomel" and pair["rejected"][0]["content"] == "the word lemon is a fruit"
    assert pair["margin"] > 0 and ties == 0
    pairs, ties = build_pairs([row], [[0.2, 0.2, 0.2, 0.2]])
    assert pairs == [] and ties == 1


def test_base_model_is_built_cached_and_rebuilt_when_missing(tiny_model_path, monkeypatch):
    from alignflow.embedded import models

    path = Path(tiny_model_path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "{% generation %}" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    spec = EmbeddedSpec(**{**_smoke_spec().model_dump(), "pretrain_steps": 3})  # a separate cache entry
    first = embedded.model_path(spec, "embedded:tiny-xs")
    weights = (Path(first) / "model.safetensors").read_bytes()
    built = (Path(first) / "model.safetensors").stat()
    build = models.build_base_model
    monkeypatch.setattr(models, "build_base_model", lambda *a, **k: pytest.fail("a cached model was built again"))
    assert embedded.model_path(spec, "embedded:tiny-xs") == first
    again = (Path(first) / "model.safetensors").stat()  # the very file the first call wrote, untouched
    assert (again.st_ino, again.st_mtime_ns, again.st_size) == (built.st_ino, built.st_mtime_ns, built.st_size)
    monkeypatch.setattr(models, "build_base_model", build)
    shutil.rmtree(first)
    assert embedded.model_path(spec, "embedded:tiny-xs") == first
    assert (Path(first) / "model.safetensors").read_bytes() == weights  # deterministic rebuild


def test_base_model_continues_text_instead_of_answering(tiny_model_path, smoke_data):
    """Pre-trained on prose only: asked in the chat format it does not end its turn with EOS."""
    from alignflow.models.generate import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    answers = generate(model, tokenizer, [r["prompt"] for r in smoke_data["eval"][:8]], max_new_tokens=12)
    assert not any(a[0]["ended"] for a in answers)
    with torch.no_grad():
        ids = tokenizer("The word lemon written backwards is", return_tensors="pt")["input_ids"]
        assert model(input_ids=ids, labels=ids).loss < 6.5  # it learned something of the prose (ln 400 ~ 6)


def _smoke_spec():
    from alignflow.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml").embedded


def test_flawed_demonstrations_take_their_share_and_are_what_they_say():
    from alignflow.embedded.suite import add_flaws

    rows = make_splits({"sft": 400}, seed=3)["sft"]
    flawed = add_flaws(rows, {"wrong": 0.2, "verbose": 0.1, "runon": 0.05}, seed=3)
    assert rows == make_splits({"sft": 400}, seed=3)["sft"]  # the input is not modified
    kinds = [r.get("flaw") for r in flawed]
    assert (kinds.count("wrong"), kinds.count("verbose"), kinds.count("runon")) == (80, 40, 20)
    verifier = Verifier()
    for clean, row in zip(rows, flawed):
        assert (clean["instruction"], clean["input"], clean["task"]) == (row["instruction"], row["input"], row["task"])
        score = verifier.score([None], [row["output"]], [clean["output"]])[0]
        if row.get("flaw") is None:
            assert row == clean
        else:  # every flaw is one the verifier counts against the answer
            assert score < 1.0, row
        if row.get("flaw") in ("verbose", "runon"):
            assert row["output"].startswith(clean["output"]) and len(row["output"]) > 2 * len(clean["output"])
    assert add_flaws(rows, {"wrong": 0.2}, seed=3) == add_flaws(rows, {"wrong": 0.2}, seed=3)  # seeded
    assert add_flaws(rows, {"wrong": 0.2}, seed=3) != add_flaws(rows, {"wrong": 0.2}, seed=4)


def test_flaws_reach_the_converted_sft_split_only(tmp_path):
    from alignflow.config import ConfigError, load_config
    from alignflow.data.instructions import load_rows
    from tests.conftest import SMOKE

    spec = load_config(SMOKE, ["embedded.flaws.runon=0.25"]).embedded
    clean = load_config(SMOKE).embedded
    assert embedded.data_dir(spec) != embedded.data_dir(clean)
    sft = load_rows(embedded.data_path(spec, "embedded:sft"))
    assert sum(r.get("flaw") == "runon" for r in sft) == round(0.25 * len(sft))
    for split in ("prompts", "eval"):  # what sampling and evaluation see is the clean suite
        assert load_rows(embedded.data_path(spec, f"embedded:{split}")) == \
            load_rows(embedded.data_path(clean, f"embedded:{split}"))
    with pytest.raises(ConfigError, match="more than 1"):
        load_config(SMOKE, ["embedded.flaws.wrong=0.6", "embedded.flaws.verbose=0.6"])


def test_the_classifier_names_each_injected_flaw_and_the_checker_answers_from_the_prompt():
    """The flaw classifier (evaluate, report) recognises what add_flaws injects, and the checker scores
    answers as the verifier does, from the prompt alone: for every task type, with no reference."""
    from alignflow.embedded.suite import add_flaws, solve
    from alignflow.rankers.verifier import Checker
    from alignflow.stats import flaw_of

    rows = make_splits({"sft": 14 * 40}, seed=5)["sft"]
    flawed = add_flaws(rows, {"wrong": 0.2, "verbose": 0.2, "runon": 0.2}, seed=5)
    for clean, row in zip(rows, flawed):
        cut = row["output"][:len(clean["output"]) + 6]  # as a generation stopped at max_new_tokens would be
        assert flaw_of(cut if row.get("flaw") == "runon" else row["output"], clean["output"]) == row.get("flaw"), row
    prompts = [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}]
               for r in rows]
    assert [solve(p[0]["content"]) for p in prompts] == [r["output"] for r in rows]
    assert {r["task"] for r in rows} == set(TASKS)
    checker, verifier = Checker(), Verifier()
    answers = [r["output"] for r in flawed]
    assert checker.score(prompts, answers, [None] * len(rows)) == \
        verifier.score(prompts, answers, [r["output"] for r in rows])
    assert solve("Tell me a joke.") is None and solve("Even or odd?\n\nseven") is None
    with pytest.raises(ValueError, match="prompt 2 .*Tell me a joke"):
        checker.score([prompts[0], [{"role": "user", "content": "Tell me a joke."}]], ["x", "y"], [None, None])
    assert checker.score([[{"role": "user", "content": "Tell me a joke."}]], ["ha"], ["ha"]) == [1.0]  # falls back


def test_prompts_without_answers_are_enough_for_the_checker(tmp_path):
    from alignflow.config import load_config
    from tasks.load_data import preflight
    from tests.conftest import SMOKE

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r["input"]}) + "\n"
                               for r in make_splits({"p": 12}, seed=1)["p"]))
    config = load_config(SMOKE, [f"sample.prompts.path={prompts}", "rank.ranker=checker"])
    assert all(r["completion"] == [] for r in preflight(config, "cpu")["prompts"][1]["sample"])
    from alignflow.data.records import DataError

    with pytest.raises(DataError, match="row 1.*output"):  # the verifier needs them
        preflight(load_config(SMOKE, [f"sample.prompts.path={prompts}"]), "cpu")
