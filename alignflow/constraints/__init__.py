"""Verifiable instruction-following constraints: IFEval's instruction ids, one checker each.

A prompt's constraints are a list of `{"id": <instruction id>, "kwargs": {...}}` (IFEval's JSONL keeps
them as two parallel lists, `instruction_id_list` and `kwargs`; alignflow.data.instructions reads both).
Each type is a pydantic model of its kwargs (alignflow.constraints.types) with

    check(response, prompt)   True when the response meets it (IFEval's own rule, written out here)
    describe(rng)             the sentence that asks for it, to build prompts with
    rewrite(text, rng)        a plain answer changed to meet it (None where it cannot), to build demonstrations

Why hand-written rather than `if-verifiable` or `lm-eval`'s ifeval module (both on PyPI): both split
sentences and words with NLTK's punkt data, which is a run-time download (offline here, and
`if-verifiable` unpickles it); no package on the index carries that data. Everything else in IFEval's
checks is a few regular expressions, so the checks are written out from IFEval's definitions and only the
sentence splitter differs: IFEval's own regex splitter (`split_into_sentences` in its
instructions_util, which it ships but does not use) in place of punkt. `language:response_language`
needs a language detector and is refused by name rather than guessed.

Accuracy as IFEval reports it: prompt-level (every constraint of a prompt met) and instruction-level
(each constraint on its own), strict, and loose (met by the answer or by the answer with its first or last
line, or its `*` marks, removed).
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import ValidationError

from alignflow.constraints import types  # noqa: F401  (registers the types)
from alignflow.constraints.base import REGISTRY, UNSUPPORTED, Constraint, ConstraintError

__all__ = ["HELD_OUT_TYPES", "REGISTRY", "Constraint", "ConstraintError", "build", "describe_all", "followed",
           "loose_variants", "parse", "rewritable"]

# the embedded suite's held-out types by default (alignflow.embedded.constraints): near kin of seen ones
HELD_OUT_TYPES = ["startend:start_checker", "detectable_content:postscript", "keywords:frequency",
                  "length_constraints:number_sentences"]


def build(instruction_id: Any, kwargs: Any) -> Constraint:
    """The constraint named by an instruction id with its kwargs; IFEval's files give every kwarg of
    every type, null where unused, so nulls are dropped. Raises ConstraintError naming the bad part."""
    if not isinstance(instruction_id, str) or instruction_id not in REGISTRY:
        why = UNSUPPORTED.get(instruction_id) if isinstance(instruction_id, str) else None
        raise ConstraintError("instruction_id_list", f"{instruction_id!r}: " + (
            f"not supported ({why})" if why else f"unknown instruction id; known: {', '.join(sorted(REGISTRY))}"))
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ConstraintError("kwargs", f"{instruction_id}: expected an object of arguments, "
                                        f"got {type(kwargs).__name__}")
    try:
        return REGISTRY[instruction_id](**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'kwargs'}: "
                             + ("not an argument of this instruction" if e["type"] == "extra_forbidden" else e["msg"])
                             for e in err.errors())
        raise ConstraintError("kwargs", f"{instruction_id}: {problems}") from None


def parse(specs: list[dict]) -> list[Constraint]:
    """Constraints from their `{"id", "kwargs"}` specs (as converted rows carry them)."""
    return [build(s["id"], s.get("kwargs")) for s in specs]


def loose_variants(response: str) -> list[str]:
    """IFEval's loose reading: the answer, without its first line, without its last, without both, each
    also with its `*` marks removed."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [c.replace("*", "") for c in cut]


def followed(constraints: list[Constraint], response: str, prompt: str = "", loose: bool = False) -> list[bool]:
    """Per constraint, whether the response meets it (strict, or IFEval's loose reading)."""
    if not loose:
        return [c.check(response, prompt) for c in constraints]
    variants = [v for v in loose_variants(response) if v.strip()]
    return [any(c.check(v, prompt) for v in variants) for c in constraints]


def rewritable() -> list[str]:
    """The types with a rewrite: a demonstration can be built for them."""
    return sorted(t for t, cls in REGISTRY.items() if cls.rewrite is not Constraint.rewrite)


def describe_all(constraints: list[Constraint], rng: random.Random) -> str:
    """The sentences asking for each constraint, each ending in punctuation, one after the other."""
    asked = [c.describe(rng) for c in constraints]
    return " ".join(a if a[-1:] in ".?!:)" else a + "." for a in asked)
