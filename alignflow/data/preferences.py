"""Preference data people bring (`dpo.data`), converted to TRL's conversational preference form:
prompt/chosen/rejected rows, chosen/rejected conversations with the prompt implicit, or UltraFeedback-like
scored answers (the best and a worse answer of each prompt). A bad row is named by file, row and field.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from alignflow.data.instructions import message_list, text_field
from alignflow.data.records import DataError, read_records

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
            answers.append((text_field({f"{where}.{text_key}": item[text_key]}, f"{where}.{text_key}", source, i),
                            _number(item[score_key], source, i, f"{where}.{score_key}")))
        return answers
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(source, "expected a list of at least two answers", row=i, field="responses")
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise DataError(source, f"expected one score per answer ({len(responses)})", row=i, field="scores")
    return [(text_field({f"responses[{j}]": r}, f"responses[{j}]", source, i), _number(s, source, i, f"scores[{j}]"))
            for j, (r, s) in enumerate(zip(responses, scores))]


def _side(value: Any, source: str, i: int, field: str) -> str:
    """A chosen/rejected answer: a string, or messages ending with the assistant's reply."""
    if isinstance(value, list):
        messages = message_list(value, source, i, field)
        if messages[-1]["role"] != "assistant":
            raise DataError(source, "the last message must be the assistant's answer", row=i, field=field)
        return messages[-1]["content"]
    return text_field({field: value}, field, source, i)


def _prompt(value: Any, source: str, i: int, field: str = "prompt") -> list[dict]:
    if isinstance(value, list):
        return message_list(value, source, i, field)
    return [{"role": "user", "content": text_field({field: value}, field, source, i)}]


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
            for side in ("chosen", "rejected"):
                if row[side] in ([], ""):
                    raise DataError(path, "empty", row=i, field=side)
            if "prompt" not in row:
                try:
                    split_row = maybe_extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
                except (TypeError, IndexError, KeyError, NameError) as err:  # TRL 1.16: UnboundLocalError too
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
