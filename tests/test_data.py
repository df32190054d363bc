import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.data.instructions import load_rows
from alignflow.data.records import DataError


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA = [{"instruction": "Reverse the word.", "input": "lemon", "output": "nomel"},
          {"instruction": "Say hi.", "input": "", "output": "hi"}]


def test_alpaca_jsonl_becomes_prompt_completion(tmp_path):
    rows = load_rows(str(write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    assert rows[0]["prompt"] == [{"role": "user", "content": "Reverse the word.\n\nlemon"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "nomel"}]
    assert rows[1]["prompt"][0]["content"] == "Say hi."  # empty input adds nothing
    assert rows[0]["task"] == "all"


def test_messages_json_and_prompt_completion_parquet(tmp_path):
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4"}], "task": "add"}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    rows = load_rows(str(tmp_path / "m.json"))
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert rows[0]["completion"][0]["content"] == "4" and rows[0]["task"] == "add"

    pq.write_table(pa.Table.from_pylist([{"prompt": "Capitalise: cat", "completion": "CAT"}]), tmp_path / "p.parquet")
    rows = load_rows(str(tmp_path / "p.parquet"))
    assert rows == [{"prompt": [{"role": "user", "content": "Capitalise: cat"}],
                     "completion": [{"role": "assistant", "content": "CAT"}], "task": "all"}]


def test_prompts_without_answers_allowed_only_when_not_required(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Write a poem."}])
    assert load_rows(str(path), require_reference=False)[0]["completion"] == []
    with pytest.raises(DataError, match=r"row 1: field 'output': missing"):
        load_rows(str(path))


@pytest.mark.parametrize("content, row, field, problem", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', 2, None, "malformed JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', 2, "output", "missing"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 7}\n', 2, "output", "expected a string"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "x"}\n', 2, "instruction", "empty"),
    ('{"question": "a", "answer": "b"}\n', 1, None, "unrecognised columns"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', 1, "messages", "role"),
    ('[1, 2]\n', 1, None, "expected a JSON object"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, content, row, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    before = sha(path)
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    message = str(err.value)
    assert str(path) in message and f"row {row}" in message and problem in message
    if field:
        assert f"field '{field}'" in message
    assert sha(path) == before  # the user's file is only read


def test_empty_missing_and_unsupported_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: dataset is empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "data.csv"))


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match="could not load hub dataset"):
        load_rows("some-org/some-dataset-that-is-not-cached")
