"""The embedded constraint suite: writing requests (topics x kinds of writing) with 1-3 verifiable
constraints each (alignflow.constraints), in IFEval's JSONL shape, split honestly.

    python -m alignflow.embedded.constraints --plain-answers   # regenerate plain_answers.jsonl (needs the model)

Splits (`embedded:ifeval-sft`, `embedded:ifeval-prompts`, `embedded:ifeval-eval`):
- topics: a third of them appear in evaluation only; SFT and sampling prompts draw from the rest;
- constraint types: `held_out_types` never appear in SFT or sampling prompts; evaluation has in-distribution
  rows (task `seen`: seen types only) and held-out rows (task `held_out`: one held-out type each).

Where the SFT demonstrations come from: SmolLM2-135M-Instruct's own greedy answer to the plain request
(no constraint), generated once and shipped in plain_answers.jsonl, then rewritten to meet each drawn
constraint by that type's rewrite (lowercased, commas dropped, cut to length, bulleted, quoted, ...) and
kept only when every checker passes. Why: the answer stays the model's own prose (close to what it
samples, so SFT teaches the format, not a new style), while the constraints it never meets when sampling
(case, quotes, fixed phrases) get demonstrations that are right by construction. Templated prose would
teach a style; rejection-sampling would never find the formats the model does not produce.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignflow.constraints import HELD_OUT_TYPES, REGISTRY, Constraint, describe_all, followed, rewritable

PLAIN_ANSWERS = Path(__file__).with_name("plain_answers.jsonl")
SUITE_VERSION = 1  # bump when the builders or the types' rewrites change what they make

TOPICS = [
    "the ocean", "coffee", "bicycles", "libraries", "volcanoes", "honeybees", "the moon", "rainforests",
    "chess", "bread baking", "trains", "winter", "music lessons", "gardening", "lighthouses", "penguins",
    "the internet", "recycling", "mountains", "friendship", "kites", "old maps", "thunderstorms", "tea",
    "museums", "deserts", "owls", "sailing", "city parks", "bridges", "dinosaurs", "clocks", "rivers",
    "camping", "robots", "painting", "rain", "elephants", "solar power", "birthdays", "street markets",
    "the post office", "snow", "farming", "photography", "whales", "hiking", "candles",
]
KINDS = {
    "paragraph": "Write a short paragraph about {topic}.",
    "describe": "Describe {topic} in a few sentences.",
    "why": "Explain why {topic} matter to people." ,
    "advice": "Give some advice to someone interested in {topic}.",
    "story": "Tell a very short story involving {topic}.",
}
EVAL_TOPICS = TOPICS[::3]  # a third of the topics: evaluation only
TRAIN_TOPICS = [t for t in TOPICS if t not in EVAL_TOPICS]

# Constraints that cannot hold together (one format excludes the other), and the order rewrites apply in:
# content first, then structure, then what wraps the whole answer, case last.
EXCLUSIVE = [
    {"change_case:english_lowercase", "change_case:english_capital", "change_case:capital_word_frequency"},
    {"detectable_format:number_bullet_lists", "length_constraints:number_paragraphs",
     "length_constraints:nth_paragraph_first_word", "detectable_format:multiple_sections",
     "combination:two_responses", "detectable_format:number_highlighted_sections"},
    {"startend:start_checker", "combination:repeat_prompt"},
]
ALONE = {"detectable_format:json_format"}  # a whole-answer format: no other constraint with it
ORDER = [
    "length_constraints:number_words", "length_constraints:number_sentences", "keywords:forbidden_words",
    "keywords:existence", "keywords:frequency", "punctuation:no_comma", "detectable_format:number_bullet_lists",
    "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
    "detectable_format:multiple_sections", "detectable_format:number_highlighted_sections",
    "combination:two_responses", "change_case:capital_word_frequency", "detectable_format:title",
    "detectable_content:number_placeholders", "startend:start_checker", "startend:end_checker",
    "detectable_content:postscript", "combination:repeat_prompt", "startend:quotation",
    "detectable_format:json_format", "change_case:english_lowercase", "change_case:english_capital",
]
COUNT_WEIGHTS = (0.5, 0.35, 0.15)  # prompts with 1, 2, 3 constraints


def default_types(held_out: list[str]) -> list[str]:
    """Every type with a rewrite that is not held out, in ORDER."""
    return [t for t in ORDER if t in rewritable() and t not in held_out]


def _compatible(chosen: list[str], candidate: str) -> bool:
    if candidate in chosen or (chosen and (candidate in ALONE or any(c in ALONE for c in chosen))):
        return False
    return not any(candidate in group and any(c in group for c in chosen) for group in EXCLUSIVE)


def draw_types(rng: random.Random, types: list[str], max_constraints: int) -> list[str]:
    count = rng.choices(range(1, len(COUNT_WEIGHTS) + 1), weights=COUNT_WEIGHTS)[0]
    chosen: list[str] = []
    for candidate in rng.sample(types, len(types)):
        if len(chosen) >= min(count, max_constraints):
            break
        if _compatible(chosen, candidate):
            chosen.append(candidate)
    return sorted(chosen, key=ORDER.index)


def _constraint(type_id: str, rng: random.Random, request: str, text: str | None) -> Constraint:
    cls = REGISTRY[type_id]
    return cls(prompt_to_repeat=request) if type_id == "combination:repeat_prompt" else cls.draw(rng, text)


def ifeval_row(key: str, request: str, constraints: list[Constraint], rng: random.Random, task: str,
               response: str | None = None) -> dict:
    row = {"key": key, "prompt": f"{request} {describe_all(constraints, rng)}",
           "instruction_id_list": [c.id for c in constraints], "kwargs": [c.model_dump() for c in constraints],
           "task": task}
    return row | ({"response": response} if response is not None else {})


def demonstration(plain: str, request: str, types: list[str],
                  rng: random.Random) -> tuple[list[Constraint], str] | None:
    """The plain answer rewritten to meet constraints of `types`, checked; None when a rewrite fails."""
    constraints = [_constraint(t, rng, request, plain) for t in types]
    text = plain
    for c in constraints:
        text = c.rewrite(text, rng)
        if text is None:
            return None
    return (constraints, text) if text.strip() and all(followed(constraints, text)) else None


PLAIN_WORDS = 60  # a demonstration starts from the plain answer's first sentences, up to this many words


def read_plain_answers() -> list[dict]:
    """The shipped plain answers, each cut to whole sentences (an answer cut off by the token limit loses its
    unfinished last sentence) of at most PLAIN_WORDS words: short demonstrations that end."""
    from alignflow.constraints.types import sentences, words

    with open(PLAIN_ANSWERS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        found = sentences(row["answer"])
        if not row["ended"] and found:
            found = found[:-1]
        found = [s for i, s in enumerate(found) if s not in found[:i]]  # the model's own repeats dropped
        kept = found[:1]
        for s in found[1:]:
            if len(words(" ".join(kept + [s]))) > PLAIN_WORDS:
                break
            kept.append(s)
        row["answer"] = " ".join(kept)
    return [r for r in rows if r["answer"]]


def make_splits(sizes: dict[str, int], seed: int, types: list[str] | None = None,
                held_out_types: list[str] | None = None, max_constraints: int = 3) -> dict[str, list[dict]]:
    """{"sft", "prompts", "eval"} rows in IFEval's JSONL shape (+ `task`; SFT rows + `response`).
    sizes: sft, prompts, eval (in-distribution rows), held_out (eval rows of held-out types)."""
    held = list(HELD_OUT_TYPES if held_out_types is None else held_out_types)
    seen = list(types or default_types(held))
    if overlap := sorted(set(seen) & set(held)):
        raise ValueError(f"constraint types both seen and held out: {overlap}")
    rng = random.Random(f"constraints-{seed}")
    plain = [p for p in read_plain_answers() if p["topic"] in TRAIN_TOPICS]
    splits = {"sft": [], "prompts": [], "eval": []}
    attempts = 0
    while len(splits["sft"]) < sizes["sft"]:
        attempts += 1
        if attempts > 50 * sizes["sft"]:
            raise ValueError(f"only {len(splits['sft'])} demonstrations of {sizes['sft']} could be built for "
                             f"types {seen}")
        answer = rng.choice(plain)
        request = KINDS[answer["kind"]].format(topic=answer["topic"])
        built = demonstration(answer["answer"], request, draw_types(rng, seen, max_constraints), rng)
        if built is not None:
            splits["sft"].append(ifeval_row(f"sft-{len(splits['sft'])}", request, built[0], rng, "seen", built[1]))

    def prompts(n: int, topics: list[str], kinds_of: list[str], one_held_out: bool, split: str) -> list[dict]:
        rows = []
        for i in range(n):
            request = KINDS[rng.choice(list(KINDS))].format(topic=rng.choice(topics))
            chosen = [rng.choice(held)] if one_held_out else draw_types(rng, kinds_of, max_constraints)
            constraints = [_constraint(t, rng, request, None) for t in chosen]
            rows.append(ifeval_row(f"{split}-{i}", request, constraints, rng, "held_out" if one_held_out else "seen"))
        return rows

    splits["prompts"] = prompts(sizes["prompts"], TRAIN_TOPICS, seen, False, "prompt")
    splits["eval"] = prompts(sizes["eval"], EVAL_TOPICS, seen, False, "eval")
    if held and sizes.get("held_out", 0):
        splits["eval"] += prompts(sizes["held_out"], EVAL_TOPICS, held, True, "heldout")
    return splits


def write_plain_answers(model: str = "embedded:smollm2-135m", max_new_tokens: int = 128) -> None:
    """SmolLM2's greedy answer to every plain request of the training topics (the demonstrations' source)."""
    from transformers import AutoModelForCausalLM

    from alignflow.files import home
    from alignflow.models import gguf
    from alignflow.models.generate import generate
    from alignflow.models.loading import load_tokenizer

    path = str(gguf.converted_dir(gguf.packaged_source(model), home()))
    tokenizer = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    asks = [(topic, kind, request.format(topic=topic)) for topic in TRAIN_TOPICS for kind, request in KINDS.items()]
    outputs = generate(lm, tokenizer, [[{"role": "user", "content": a[2]}] for a in asks],
                       max_new_tokens=max_new_tokens, batch_size=16)
    with open(PLAIN_ANSWERS, "w", encoding="utf-8") as f:
        for (topic, kind, _), out in zip(asks, outputs):
            f.write(json.dumps({"topic": topic, "kind": kind, "answer": out[0]["text"].strip(),
                                "ended": out[0]["ended"]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    if "--plain-answers" in sys.argv:
        write_plain_answers()
    else:
        print(json.dumps({k: len(v) for k, v in make_splits({"sft": 200, "prompts": 120, "eval": 120,
                                                                 "held_out": 60}, 0).items()}))
