import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow import embedded
from alignflow.config import EmbeddedSpec
from alignflow.embedded.suite import TASKS, make_splits
from alignflow.pairs import build_pairs
from alignflow.rankers import Verifier


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


def test_base_model_is_built_cached_and_rebuilt_when_missing(tiny_model_path):
    path = Path(tiny_model_path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "{% generation %}" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    spec = EmbeddedSpec(**{**_smoke_spec().model_dump(), "pretrain_steps": 3})  # a separate cache entry
    first = embedded.model_path(spec, "embedded:tiny-xs")
    weights = (Path(first) / "model.safetensors").read_bytes()
    assert embedded.model_path(spec, "embedded:tiny-xs") == first  # cached: same path, not rebuilt
    shutil.rmtree(first)
    assert embedded.model_path(spec, "embedded:tiny-xs") == first
    assert (Path(first) / "model.safetensors").read_bytes() == weights  # deterministic rebuild


def test_base_model_continues_text_instead_of_answering(tiny_model_path, smoke_data):
    """Pre-trained on prose only: asked in the chat format it does not end its turn with EOS."""
    from alignflow.modeling import generate

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
