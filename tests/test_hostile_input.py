"""Hostile and malformed input, property-based (hypothesis): whatever bytes a data file or a config
override holds, the reader gives either a valid dataset or one DataError/ConfigError naming the file,
row and field (the key) — never another exception type — and never modifies the input file."""

from __future__ import annotations

import codecs
import copy
import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignflow.config import ConfigError, load_config, validate_config
from alignflow.data.instructions import load_rows
from alignflow.data.preferences import load_preference_rows
from alignflow.data.records import DataError, write_jsonl
from tests.conftest import SMOKE

FIELDS = ["instruction", "input", "output", "messages", "prompt", "completion", "chosen", "rejected", "role",
          "content", "task", "flaw", "completions", "responses", "scores", "response", "overall_score"]
ROLES = ["system", "user", "assistant", "tool", ""]
AWKWARD_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30) | st.sampled_from(
    ["", " ", "\x00", "\u202e", "\ufeff", "a\r\nb", "\t", "x" * 5000, "\ud800"])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
           | st.floats(allow_nan=True, allow_infinity=True) | AWKWARD_TEXT)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES)}, optional={"content": scalars}),
                    max_size=4)
json_values = st.recursive(scalars | messages, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | AWKWARD_TEXT, inner, max_size=5),
                           max_leaves=20)
rows = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6) | json_values


def _encode_line(value, encoding: str) -> bytes:
    text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    return text.encode(encoding, errors="surrogatepass")


@st.composite
def data_files(draw) -> tuple[str, bytes, int]:
    """(suffix, file bytes, number of lines): mixed shapes, several encodings, BOM, CRLF, raw garbage,
    JSON nested far past Python's recursion limit, huge integers, control characters."""
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1", "cp1252"]))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines = []
    for kind in draw(st.lists(st.sampled_from(["row", "row", "row", "bytes", "deep", "bigint", "ctrl", "blank"]),
                              min_size=1, max_size=6)):
        if kind == "row":
            try:
                lines.append(_encode_line(draw(rows), encoding))
            except UnicodeEncodeError:
                lines.append(draw(st.binary(max_size=40)))
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=40)).replace(b"\n", b""))
        elif kind == "deep":
            depth = draw(st.sampled_from([50, 5000, 100_000]))
            lines.append(b'{"instruction": ' + b"[" * depth + b"]" * depth + b"}")
        elif kind == "bigint":
            lines.append(b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}")
        elif kind == "ctrl":
            lines.append(b'{"instruction": "a\x01\x1b", "output": "b"}')
        else:
            lines.append(b"")
    body = newline.join(lines)
    if draw(st.booleans()):
        body = codecs.BOM_UTF8 + body
    suffix = draw(st.sampled_from([".jsonl", ".jsonl", ".json"]))
    if suffix == ".json" and draw(st.booleans()):  # a JSON list of the same rows
        body = b"[" + b",".join(line for line in lines if line.strip()) + b"]"
    return suffix, body, len(lines) + 1


def _check_dataset(result: list[dict]) -> None:
    """A valid dataset: TRL's conversational rows that the next stage can write and read back."""
    assert result
    for row in result:
        for message in row["prompt"] + row.get("completion", []) + row.get("chosen", []) + row.get("rejected", []):
            assert message["role"] in {"system", "user", "assistant"} and isinstance(message["content"], str)
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(result, Path(tmp) / "out.jsonl")


def _check_error(err: DataError, path: Path, n_lines: int) -> None:
    message = str(err)
    assert message.startswith(str(path)), message
    assert "\n" not in message, message
    assert len(message) < 2000, message[:200]
    if err.row is not None:
        assert 1 <= err.row <= max(n_lines, 1), (err.row, n_lines)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])


@FUZZ
@given(data_files(), st.booleans())
def test_any_data_file_gives_a_dataset_or_one_data_error(case, require_reference):
    suffix, body, n_lines = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(body)
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        for load in (lambda: load_rows(str(path), require_reference=require_reference),
                     lambda: load_preference_rows(str(path))[0]):
            try:
                result = load()
            except DataError as err:
                _check_error(err, path, n_lines)
            else:
                _check_dataset(result)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the input is never modified


def test_named_cases(tmp_path):
    """The cases a user meets, each with its own words."""
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: row 2: not UTF-8 text: byte b'\\xe9'"):
        load_rows(str(latin))

    windows = tmp_path / "windows.jsonl"  # Notepad's UTF-8: a byte-order mark and CRLF line ends
    windows.write_bytes(codecs.BOM_UTF8 + b'{"instruction": "a", "output": "b"}\r\n{"instruction": "c", '
                        b'"output": "d"}\r\n')
    assert [r["prompt"][0]["content"] for r in load_rows(str(windows))] == ["a", "c"]

    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: unreadable JSON value"):
        load_rows(str(deep))

    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "\\ud800", "output": "b"}\n')
    with pytest.raises(DataError, match=r"row 2: a \\u escape encodes a lone UTF-16 surrogate"):
        load_rows(str(surrogate))

    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}\n')
    with pytest.raises(DataError, match=r"row 1: field 'scores\[1\]': expected a finite number, got nan"):
        load_preference_rows(str(nan))


DEFAULT_TREE = yaml.safe_load(SMOKE.read_text())
SECTIONS = sorted(DEFAULT_TREE)
KEYS = (st.sampled_from(["sft.trainer.learning_rate", "sft.lora.r", "sample.num_candidates", "rank.ranker",
                         "rank.ranker.type", "dpo.trainer.beta", "seed", "base.candidates", "sft.launch.num_processes",
                         "sample.engine.type", "eval.win_rate_by", "sft", "tracking.experiment"])
        | st.builds(lambda parts: ".".join(parts), st.lists(st.sampled_from(SECTIONS) | AWKWARD_TEXT, min_size=1,
                                                            max_size=4)).filter(lambda key: "=" not in key))
VALUES = st.sampled_from(["1e-4", "-3", "nan", "[a, b]", "{type: judge}", "{", "]", "!!python/object:os.system",
                          "[" * 2000, "null", "~", "'x'", "&a [*a]", "9" * 5000, "{type: verifier, bogus: 1}",
                          "inf", "true", ""]) | AWKWARD_TEXT


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_any_config_override_gives_a_config_or_one_config_error(overrides):
    items = [f"{key}={value}" for key, value in overrides]
    before = copy.deepcopy(DEFAULT_TREE)
    try:
        config = validate_config(DEFAULT_TREE, source=str(SMOKE), overrides=items)
    except ConfigError as err:
        message = str(err)
        # the message names the key at fault: one of the overridden keys, or its first section
        named = [key.split(".")[0].strip() for key, _ in overrides]
        assert any(name in message or repr(name)[1:-1] in message for name in named), message
    else:
        assert len(config.digest()) == 16  # a valid config can be hashed (its `config_hash` tag)
    assert DEFAULT_TREE == before  # the config tree given is left unchanged


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.sampled_from([b"\xff\xfe" + "a: 1".encode("utf-16-le"), b"[" * 5000,
                                                    b"sft: {trainer: {learning_rate: caf\xe9}}"]))
def test_any_config_file_gives_a_config_or_one_config_error(body):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.yaml"
        path.write_bytes(body)
        try:
            load_config(path)
        except ConfigError as err:
            assert str(err).startswith(str(path))


def test_empty_preference_sides_are_named(tmp_path):
    """Found by the fuzzer: TRL's prompt extraction fails on empty lists with an UnboundLocalError."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"chosen": [], "rejected": []}\n')
    with pytest.raises(DataError, match=r"row 1: field 'chosen': empty"):
        load_preference_rows(str(path))
