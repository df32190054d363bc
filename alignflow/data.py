"""Reading instruction data in the shapes people have it, and converting it once to one form.

Accepted row shapes (JSON, JSONL, Parquet, or a hub dataset):
  alpaca             {"instruction", "input"?, "output"}           (Alpaca, FLAN-style)
  messages           {"messages": [{"role", "content"}, ...]}       (TRL conversational)
  prompt/completion  {"prompt", "completion"}: strings or message lists

Everything becomes TRL's conversational prompt/completion form, plus the task type:
  {"prompt": [{"role": "user", "content": ...}, ...], "completion": [{"role": "assistant", ...}], "task": str}
so SFT loss falls on the completion only, whatever the tokenizer's chat template. A bad row is
reported with its file, row number (1-based; the line number for JSONL) and field.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Iterator

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = {"system", "user", "assistant"}
MAX_PROBLEM = 400  # characters of a DataError's problem: a quoted row or value is cut, not printed whole


class DataError(ValueError):
    def __init__(self, source: str, problem: str, row: int | None = None, field: str | None = None):
        where = source + (f": row {row}" if row is not None else "") + (f": field '{field}'" if field else "")
        problem = " ".join(problem.split())  # one line, however long or odd the value it quotes
        if len(problem) > MAX_PROBLEM:
            problem = problem[:MAX_PROBLEM - 1] + "…"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field = source, row, field


def read_records(path: str, split: str = "train") -> list[dict]:
    """Raw rows from a local file, or from the hub when `path` is not a local file."""
    return [row for _, row in iter_records(path, split)]


def iter_records(path: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """(row number, raw row), streamed: a JSONL file line by line (the number is the line's), Parquet by
    record batch, a hub dataset from its memory-mapped Arrow cache; a JSON file is parsed whole (JSON has
    no row boundaries to stream by)."""
    file = Path(path)
    if file.suffix in FILE_SUFFIXES or file.exists():
        if not file.is_file():
            raise DataError(path, "file not found")
        if file.suffix == ".jsonl":
            yield from _read_jsonl(file)
        elif file.suffix == ".json":
            yield from enumerate(_read_json(file), start=1)
        elif file.suffix == ".parquet":
            yield from _read_parquet(file)
        else:
            raise DataError(path, f"unsupported file type {file.suffix!r}; use one of {FILE_SUFFIXES}")
        return
    import datasets

    try:
        hub = datasets.load_dataset(path, split=split)
    except Exception as err:  # offline, unknown name, missing split: all end here
        raise DataError(path, f"could not load hub dataset (split {split!r}): {err}") from None
    yield from enumerate(hub, start=1)


def _read_parquet(file: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=4096)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                yield i, row
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(str(file), f"not a readable Parquet file ({err})") from None


NEWLINE = b"\n"
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: maybe a lone surrogate


def _decode(raw: bytes, file: Path, row: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = "" if row is not None else f" at line {raw.count(NEWLINE, 0, err.start) + 1}"
        raise DataError(str(file), f"not UTF-8 text: byte {raw[err.start:err.start + 1]!r}{where} "
                        "(save the file as UTF-8)", row=row) from None


def _parse(text: str, file: Path, row: int | None):
    """One JSON value; every way it can fail (malformed, nested past Python's recursion limit, an
    integer too long to convert, a lone surrogate that could never be written back) is a DataError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if row is not None else f"line {err.lineno} column {err.colno}"
        raise DataError(str(file), f"malformed JSON ({err.msg} at {at})", row=row) from None
    except (ValueError, RecursionError) as err:
        raise DataError(str(file), f"unreadable JSON value ({str(err) or type(err).__name__})", row=row) from None
    if SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise DataError(str(file), "a \\u escape encodes a lone UTF-16 surrogate, which is not text",
                            row=row) from None
    return value


def _read_jsonl(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL file, read as bytes so that a line that is not UTF-8 is named by its
    number; a UTF-8 byte-order mark and CRLF line ends are accepted."""
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            line = _decode(raw, file, line_no)
            if not line.strip():
                continue
            row = _parse(line, file, line_no)
            if not isinstance(row, dict):
                raise DataError(str(file), f"expected a JSON object, got {type(row).__name__}", row=line_no)
            yield line_no, row


def _read_json(file: Path) -> list[dict]:
    raw = file.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    data = _parse(_decode(raw, file, None), file, None)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(data, list):
        raise DataError(str(file), "expected a list of objects (or one key holding a list)")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(str(file), f"expected a JSON object, got {type(row).__name__}", row=i)
    return data


def detect_shape(rows: list[dict], source: str, row: int = 1) -> str:
    """The shape of a dataset, from its first row (`row`: that row's number)."""
    first = rows[0]
    if "messages" in first:
        return "messages"
    if "prompt" in first:
        return "prompt_completion"
    if "instruction" in first:
        return "alpaca"
    raise DataError(source, f"unrecognised columns {sorted(first)}: expected 'instruction'/'output' (Alpaca), "
                    "'messages', or 'prompt'/'completion'", row=row)


def _text(row: dict, field: str, source: str, i: int, required: bool = True) -> str | None:
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


def _messages(value: Any, source: str, i: int, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(source, "expected a non-empty list of {role, content} messages", row=i, field=field)
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DataError(source, f"message {j} must be {{role: system|user|assistant, content: string}}",
                            row=i, field=field)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def convert_row(row: dict, shape: str, source: str, i: int, require_reference: bool) -> dict:
    if shape == "alpaca":
        instruction = _text(row, "instruction", source, i)
        extra = _text(row, "input", source, i, required=False)
        output = _text(row, "output", source, i, required=require_reference)
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        prompt, answer = [{"role": "user", "content": user}], output
    elif shape == "messages":
        messages = _messages(row.get("messages"), source, i, "messages")
        if messages[-1]["role"] == "assistant":
            prompt, answer = messages[:-1], messages[-1]["content"]
            if not prompt:
                raise DataError(source, "an assistant reply with no prompt before it", row=i, field="messages")
        else:
            prompt, answer = messages, None
    else:
        if isinstance(row.get("prompt"), list):
            prompt = _messages(row["prompt"], source, i, "prompt")
        else:
            prompt = [{"role": "user", "content": _text(row, "prompt", source, i)}]
        if isinstance(row.get("completion"), list):
            answer = _messages(row["completion"], source, i, "completion")[-1]["content"]
        else:
            answer = _text(row, "completion", source, i, required=require_reference)
    if require_reference and not (answer and answer.strip()):
        field = {"alpaca": "output", "messages": "messages", "prompt_completion": "completion"}[shape]
        raise DataError(source, "no reference answer (needed by this stage)", row=i, field=field)
    task, flaw = row.get("task"), row.get("flaw")
    converted = {
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": answer}] if answer else [],
        "task": task if isinstance(task, str) and task else "all",
    }
    if isinstance(flaw, str) and flaw:  # a known flaw of this demonstration (the embedded suite's `flaws`)
        converted["flaw"] = flaw
    return converted


def convert_rows(path: str, *, split: str = "train", limit: int | None = None,
                 require_reference: bool = True) -> Iterator[dict]:
    """Read, validate and convert a dataset row by row (memory bounded by one row, not the file); raises
    DataError naming the file, row and field."""
    shape, n = None, 0
    for i, row in iter_records(path, split):
        if limit and n >= limit:
            break
        shape = shape or detect_shape([row], path, i)
        yield convert_row(row, shape, path, i, require_reference)
        n += 1
    if n == 0:
        raise DataError(path, "dataset is empty")


def load_rows(path: str, *, split: str = "train", limit: int | None = None,
              require_reference: bool = True) -> list[dict]:
    """Read, validate and convert a dataset; raises DataError naming the file, row and field."""
    return list(convert_rows(path, split=split, limit=limit, require_reference=require_reference))


SAMPLE_ROWS = 1000  # rows of a converted dataset kept in memory: its MLflow schema and profile


def write_converted(path: str, out: Path, *, split: str = "train", limit: int | None = None,
                    require_reference: bool = True) -> dict[str, Any]:
    """Convert a dataset into `out` (JSONL), streaming: peak memory does not grow with the file. Returns
    {"rows": n, "flaws": {kind: count}, "sample": the first SAMPLE_ROWS converted rows}. On a DataError
    nothing is left at `out`."""
    from collections import Counter

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    n, flaws, sample = 0, Counter(), []
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for row in convert_rows(path, split=split, limit=limit, require_reference=require_reference):
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


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- preference data (dpo.data) -------------------------------------------------------------------------
# Accepted row shapes, converted to the pairs the rank stage writes ({prompt, chosen, rejected} as messages):
#   explicit prompt   {"prompt", "chosen", "rejected"}: strings or message lists (TRL's preference shapes)
#   implicit prompt   {"chosen", "rejected"}: whole conversations (or texts) sharing the prompt as their prefix
#   scored            UltraFeedback-like: {"prompt" | "instruction", "completions": [{"response", "overall_score"}]}
#                     or {"prompt", "responses": [...], "scores": [...]}: binarized as the best-scored answer
#                     against a random lower-scored one (seeded); a row whose answers all score the same is a tie
#                     and is dropped (counted)
TEXT_KEYS = ("response", "text", "content", "completion")
SCORE_KEYS = ("overall_score", "score", "rating")


def _number(value: Any, source: str, i: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(source, f"expected a finite number, got {reprlib.repr(value)}", row=i, field=field)
    return float(value)


def _scored(row: dict, source: str, i: int) -> list[tuple[str, float]]:
    """(answer, score) of a scored row, either shape."""
    if "completions" in row:
        if not isinstance(row["completions"], list) or len(row["completions"]) < 2:
            raise DataError(source, "expected a list of at least two scored answers", row=i, field="completions")
        answers = []
        for j, item in enumerate(row["completions"]):
            where = f"completions[{j}]"
            if not isinstance(item, dict):
                raise DataError(source, "expected an object with an answer and its score", row=i, field=where)
            text_key = next((k for k in TEXT_KEYS if k in item), None)
            score_key = next((k for k in SCORE_KEYS if k in item), None)
            if text_key is None or score_key is None:
                raise DataError(source, f"needs an answer ({'/'.join(TEXT_KEYS)}) and a score ({'/'.join(SCORE_KEYS)})",
                                row=i, field=where)
            answers.append((_text({f"{where}.{text_key}": item[text_key]}, f"{where}.{text_key}", source, i),
                            _number(item[score_key], source, i, f"{where}.{score_key}")))
        return answers
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(source, "expected a list of at least two answers", row=i, field="responses")
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise DataError(source, f"expected one score per answer ({len(responses)})", row=i, field="scores")
    return [(_text({f"responses[{j}]": r}, f"responses[{j}]", source, i), _number(s, source, i, f"scores[{j}]"))
            for j, (r, s) in enumerate(zip(responses, scores))]


def _side(value: Any, source: str, i: int, field: str) -> str:
    """A chosen/rejected answer: a string, or messages ending with the assistant's reply."""
    if isinstance(value, list):
        messages = _messages(value, source, i, field)
        if messages[-1]["role"] != "assistant":
            raise DataError(source, "the last message must be the assistant's answer", row=i, field=field)
        return messages[-1]["content"]
    return _text({field: value}, field, source, i)


def _prompt(value: Any, source: str, i: int, field: str = "prompt") -> list[dict]:
    if isinstance(value, list):
        return _messages(value, source, i, field)
    return [{"role": "user", "content": _text({field: value}, field, source, i)}]


def load_preference_rows(path: str, *, split: str = "train", limit: int | None = None,
                         seed: int = 0) -> tuple[list[dict], int]:
    """Read, validate and convert a preference dataset to pair rows; raises DataError naming the file,
    row and field. Returns (pairs, ties dropped). An implicit prompt is split off by TRL's own
    `maybe_extract_prompt` (the longest common prefix of chosen and rejected)."""
    import random

    from trl.data_utils import maybe_extract_prompt

    rows = read_records(path, split)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise DataError(path, "dataset is empty")
    rng, pairs, ties = random.Random(seed), [], 0
    for i, row in enumerate(rows, start=1):
        if "completions" in row or "responses" in row:
            prompt = _prompt(row.get("prompt", row.get("instruction")), path, i,
                             "prompt" if "prompt" in row else "instruction")
            answers = _scored(row, path, i)
            best = max(answers, key=lambda a: a[1])
            lower = [a for a in answers if a[1] < best[1]]
            if not lower:
                ties += 1
                continue
            worst = rng.choice(lower)
            chosen, rejected, margin = best[0], worst[0], best[1] - worst[1]
            scores = (best[1], worst[1])
        elif "chosen" in row and "rejected" in row:
            split_row = row  # an explicit prompt is taken as is; chosen/rejected give their last (assistant) message
            if "prompt" not in row:
                try:
                    split_row = maybe_extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
                except (TypeError, IndexError, KeyError) as err:
                    raise DataError(path, f"cannot split off the shared prompt ({err})", row=i,
                                    field="chosen") from None
            if not split_row["prompt"]:
                raise DataError(path, "no prompt: neither a `prompt` field nor a prefix shared by chosen and "
                                "rejected", row=i, field="prompt")
            prompt = _prompt(split_row["prompt"], path, i)
            chosen = _side(split_row["chosen"], path, i, "chosen")
            rejected = _side(split_row["rejected"], path, i, "rejected")
            margin, scores = None, (None, None)
        else:
            raise DataError(path, f"unrecognised columns {sorted(row)}: expected prompt/chosen/rejected, "
                            "chosen/rejected, or a prompt with scored completions (UltraFeedback)", row=i)
        if prompt[-1]["role"] != "user":
            raise DataError(path, "the prompt must end with a user message", row=i, field="prompt")
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], "margin": margin,
                      "chosen_reward": scores[0], "rejected_reward": scores[1],
                      "task": row.get("task") if isinstance(row.get("task"), str) else "all", "source": "data"})
    if not pairs:
        raise DataError(path, f"no preference pairs: all {ties} rows are ties (answers scored the same)")
    return pairs, ties
