"""Reading instruction data in the shapes people have it, and converting it once to one form.

Accepted row shapes (JSON, JSONL, Parquet, or a hub dataset):
  alpaca             {"instruction", "input"?, "output"}           (Alpaca, FLAN-style)
  messages           {"messages": [{"role", "content"}, ...]}       (TRL conversational)
  prompt/completion  {"prompt", "completion"}: strings or message lists
  ifeval             {"key"?, "prompt", "instruction_id_list", "kwargs", "response"?}  (IFEval's JSONL;
                     `response`, a demonstration, must meet its constraints)

Everything becomes TRL's conversational prompt/completion form, plus the task type:
  {"prompt": [{"role": "user", "content": ...}, ...], "completion": [{"role": "assistant", ...}], "task": str}
plus, for a prompt with verifiable constraints, "constraints": [{"id": IFEval instruction id, "kwargs": {...}}]
(alignflow.constraints): what a checker verifies an answer against in place of a reference answer.
so SFT loss falls on the completion only, whatever the tokenizer's chat template. A bad row is
reported with its file, row number (1-based; the line number for JSONL) and field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from alignflow.data.records import DataError, iter_records

ROLES = {"system", "user", "assistant"}


def detect_shape(rows: list[dict], source: str, row: int = 1) -> str:
    """The shape of a dataset, from its first row (`row`: that row's number)."""
    first = rows[0]
    if "instruction_id_list" in first:
        return "ifeval"
    if "messages" in first:
        return "messages"
    if "prompt" in first:
        return "prompt_completion"
    if "instruction" in first:
        return "alpaca"
    raise DataError(source, f"unrecognised columns {sorted(first)}: expected 'instruction'/'output' (Alpaca), "
                    "'messages', or 'prompt'/'completion'", row=row)


def text_field(row: dict, field: str, source: str, i: int, required: bool = True) -> str | None:
    if field not in row or row[field] is None:
        if required:
            raise DataError(source, "missing", row=i, field=field)
        return None
    value = row[field]
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, got {type(value).__name__}", row=i, field=field)
    if required and not value.strip():
        raise DataError(source, "empty", row=i, field=field)
    return value


def message_list(value: Any, source: str, i: int, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(source, "expected a non-empty list of {role, content} messages", row=i, field=field)
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DataError(source, f"message {j} must be {{role: system|user|assistant, content: string}}",
                            row=i, field=field)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def constraint_specs(row: dict, source: str, i: int) -> list[dict]:
    """IFEval's two parallel lists (instruction ids, their kwargs) as checked constraint specs."""
    from alignflow.constraints import ConstraintError, build

    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if not isinstance(ids, list) or not ids:
        raise DataError(source, "expected a non-empty list of instruction ids", row=i, field="instruction_id_list")
    if kwargs is None:
        kwargs = [{}] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(source, f"expected a list of {len(ids)} argument objects, one per instruction id",
                        row=i, field="kwargs")
    try:
        return [build(k, a).spec() for k, a in zip(ids, kwargs)]
    except ConstraintError as err:
        raise DataError(source, str(err), row=i, field=err.field) from None


def reference_of(row: dict) -> str | list[dict] | None:
    """What an answer to a converted row is checked against: its constraints when it has them (IFEval's
    instruction ids), else its reference answer, else None."""
    if row.get("constraints"):
        return row["constraints"]
    return row["completion"][0]["content"] if row.get("completion") else None


def convert_row(row: dict, shape: str, source: str, i: int, require_reference: bool,
                constraints_suffice: bool = False, require_constraints: bool = False) -> dict:
    """One row in the converted form. `require_reference`: the row must carry a reference answer, or, with
    `constraints_suffice`, verifiable constraints instead (evaluation and ranking check either);
    `require_constraints`: it must carry constraints (the constraints ranker checks nothing else)."""
    constraints = None
    if require_constraints and shape != "ifeval":
        raise DataError(source, "no verifiable constraints (needed by the constraints ranker): give IFEval's "
                        "'instruction_id_list' and 'kwargs'", row=i, field="instruction_id_list")
    if shape == "ifeval":
        constraints = constraint_specs(row, source, i)
        prompt = [{"role": "user", "content": text_field(row, "prompt", source, i)}]
        answer = text_field(row, "response", source, i, required=False)
        if answer is not None:
            from alignflow.constraints import followed, parse

            met = followed(parse(constraints), answer, prompt[0]["content"])
            if not all(met):
                failed = [c["id"] for c, ok in zip(constraints, met) if not ok]
                raise DataError(source, f"the demonstration does not meet its own constraints {failed}", row=i,
                                field="response")
    elif shape == "alpaca":
        instruction = text_field(row, "instruction", source, i)
        extra = text_field(row, "input", source, i, required=False)
        output = text_field(row, "output", source, i, required=require_reference)
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        prompt, answer = [{"role": "user", "content": user}], output
    elif shape == "messages":
        messages = message_list(row.get("messages"), source, i, "messages")
        if messages[-1]["role"] == "assistant":
            prompt, answer = messages[:-1], messages[-1]["content"]
            if not prompt:
                raise DataError(source, "an assistant reply with no prompt before it", row=i, field="messages")
        else:
            prompt, answer = messages, None
    else:
        if isinstance(row.get("prompt"), list):
            prompt = message_list(row["prompt"], source, i, "prompt")
        else:
            prompt = [{"role": "user", "content": text_field(row, "prompt", source, i)}]
        if isinstance(row.get("completion"), list):
            answer = message_list(row["completion"], source, i, "completion")[-1]["content"]
        else:
            answer = text_field(row, "completion", source, i, required=require_reference)
    if require_reference and not (answer and answer.strip()) and not (constraints and constraints_suffice):
        field = {"alpaca": "output", "messages": "messages", "prompt_completion": "completion",
                 "ifeval": "response"}[shape]
        raise DataError(source, "no reference answer (needed by this stage)", row=i, field=field)
    task, flaw = row.get("task"), row.get("flaw")
    converted = {
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": answer}] if answer else [],
        "task": task if isinstance(task, str) and task else "all",
    }
    if isinstance(flaw, str) and flaw:  # a known flaw of this demonstration (the embedded suite's `flaws`)
        converted["flaw"] = flaw
    if constraints:
        converted["constraints"] = constraints
    return converted


def convert_rows(path: str, *, split: str = "train", limit: int | None = None,
                 require_reference: bool = True, constraints_suffice: bool = False,
                 require_constraints: bool = False) -> Iterator[dict]:
    """Read, validate and convert a dataset row by row (memory bounded by one row, not the file); raises
    DataError naming the file, row and field."""
    shape, n = None, 0
    for i, row in iter_records(path, split):
        if limit and n >= limit:
            break
        shape = shape or detect_shape([row], path, i)
        yield convert_row(row, shape, path, i, require_reference, constraints_suffice, require_constraints)
        n += 1
    if n == 0:
        raise DataError(path, "dataset is empty")


def load_rows(path: str, *, split: str = "train", limit: int | None = None, **checks) -> list[dict]:
    """Read, validate and convert a dataset (`checks`: convert_row's); raises DataError naming the file, row
    and field."""
    return list(convert_rows(path, split=split, limit=limit, **checks))


SAMPLE_ROWS = 1000  # rows of a converted dataset kept in memory: its MLflow schema and profile


def write_converted(path: str, out: Path, *, split: str = "train", limit: int | None = None,
                    require_reference: bool = True, constraints_suffice: bool = False,
                    require_constraints: bool = False) -> dict[str, Any]:
    """Convert a dataset into `out` (JSONL), streaming: peak memory does not grow with the file. Returns
    {"rows": n, "flaws": {kind: count}, "sample": the first SAMPLE_ROWS converted rows}. On a DataError
    nothing is left at `out`."""
    from collections import Counter

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    n, flaws, sample = 0, Counter(), []
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for row in convert_rows(path, split=split, limit=limit, require_reference=require_reference,
                                    constraints_suffice=constraints_suffice,
                                    require_constraints=require_constraints):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
                if row.get("flaw"):
                    flaws[row["flaw"]] += 1
                if len(sample) < SAMPLE_ROWS:
                    sample.append(row)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return {"rows": n, "flaws": dict(flaws), "sample": sample}
