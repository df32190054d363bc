"""Hostile and malformed input, property-based (hypothesis): whatever bytes a data file (JSON, JSONL, Parquet),
a labels file for `alignflow label import` (CSV, JSONL) or a config override holds, the reader gives either a
valid dataset or one DataError/LabelError/ConfigError naming the file, row and field (the key) in one line
with at most 400 characters of problem (docs/operations.md) — never another exception type — and never
modifies the input file."""

from __future__ import annotations

import codecs
import copy
import csv
import functools
import hashlib
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from alignflow.config import ConfigError, load_config, validate_config
from alignflow.data.instructions import load_rows
from alignflow.data.preferences import load_preference_rows
from alignflow.data.records import MAX_PROBLEM, DataError, write_jsonl
from alignflow.rankers.human import LabelError, read_label_file
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
    """One line: `<file>[: row N][: field 'F']: <problem>`, the problem at most MAX_PROBLEM (400) characters."""
    message = str(err)
    assert err.source == str(path), (err.source, message)
    where = str(path) + (f": row {err.row}" if err.row is not None else "") + \
        (f": field '{err.field}'" if err.field else "")
    assert message.startswith(where + ": "), message
    assert "\n" not in message, message
    problem = message[len(where) + 2:]
    assert 0 < len(problem) <= MAX_PROBLEM == 400, (len(problem), problem[:200])
    if err.row is not None:
        assert 1 <= err.row <= max(n_lines, 1), (err.row, n_lines)


def test_a_long_problem_is_cut_to_400_characters(tmp_path):
    """The cap the fuzz checks is the one documented, and it cuts: a problem quoting a 5,000-character column."""
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"x" * 5000: "a"}) + "\n")
    with pytest.raises(DataError, match="unrecognised columns") as err:
        load_rows(str(path))
    _check_error(err.value, path, 2)
    assert str(err.value).endswith("…") and len(str(err.value)) == len(f"{path}: row 1: ") + 400


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])

PARQUET_TEXT = AWKWARD_TEXT.filter(lambda text: "\ud800" not in text)  # Arrow's strings are valid UTF-8


def _parquet_column(kind: str):
    """(Arrow type, strategy of one cell) of a column of the given kind; every cell may be null."""
    import pyarrow as pa

    message = st.fixed_dictionaries({"role": st.sampled_from(ROLES) | st.none(), "content": PARQUET_TEXT | st.none()})
    kinds = {
        "text": (pa.string(), PARQUET_TEXT),
        "int": (pa.int64(), st.integers(-2 ** 63, 2 ** 63 - 1)),
        "float": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
        "bool": (pa.bool_(), st.booleans()),
        "binary": (pa.binary(), st.binary(max_size=20)),
        "texts": (pa.list_(pa.string()), st.lists(PARQUET_TEXT, max_size=3)),
        "floats": (pa.list_(pa.float64()), st.lists(st.floats(allow_nan=True), max_size=3)),
        "messages": (pa.list_(pa.struct({"role": pa.string(), "content": pa.string()})), st.lists(message, max_size=3)),
        "struct": (pa.struct({"role": pa.string(), "content": pa.int64()}),
                   st.fixed_dictionaries({"role": PARQUET_TEXT, "content": st.integers(-5, 5)})),
        "null": (pa.null(), st.none()),
    }
    arrow_type, cell = kinds[kind]
    return arrow_type, st.none() | cell


def _parquet_bytes(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


@st.composite
def parquet_files(draw) -> tuple[bytes, int]:
    """(file bytes, number of rows + 1): a real Parquet file with columns of awkward types and values (null,
    binary, structs, NaN, 64-bit extremes, message lists with missing roles), sometimes cut short or with
    bytes overwritten, sometimes not Parquet at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_rows = draw(st.integers(0, 4))
    columns, fields = {}, []
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=5)):
        kind = draw(st.sampled_from(["text", "text", "text", "messages", "int", "float", "bool", "binary", "texts",
                                     "floats", "struct", "null"]))
        arrow_type, cell = _parquet_column(kind)
        columns[name] = pa.array(draw(st.lists(cell, min_size=n_rows, max_size=n_rows)), type=arrow_type)
        fields.append(pa.field(name, arrow_type))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(columns, schema=pa.schema(fields)) if fields else
                   pa.table({"x": pa.array([None] * n_rows, type=pa.null())}), buffer)
    body = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "none", "cut", "overwrite", "garbage"]))
    if damage == "cut":
        body = body[:draw(st.integers(0, len(body) - 1))]
    elif damage == "overwrite":
        at = draw(st.integers(0, len(body) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        body = body[:at] + patch + body[at + len(patch):]
    elif damage == "garbage":
        body = draw(st.binary(max_size=200))
    return body, n_rows + 1


def _read_each_way(path: Path, n_lines: int, require_reference: bool) -> None:
    """Both readers of user data on one file: a dataset or one DataError; the file left as it was."""
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


@FUZZ
@given(data_files(), st.booleans())
def test_any_data_file_gives_a_dataset_or_one_data_error(case, require_reference):
    suffix, body, n_lines = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(body)
        _read_each_way(path, n_lines, require_reference)


@settings(FUZZ, max_examples=100)
@given(parquet_files(), st.booleans())
@example((_parquet_bytes({"instruction": ["a", "b"], "output": ["c", "d"]}), 3), True)  # a dataset
@example((_parquet_bytes({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}), 2), False)  # a preference pair
def test_any_parquet_file_gives_a_dataset_or_one_data_error(case, require_reference):
    body, n_lines = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        path.write_bytes(body)
        _read_each_way(path, n_lines, require_reference)


LABELS_EXPECTED = {"p0": ["c0", "c1", "c2"], "p1": ["c0", "c1"]}
LABEL_COLUMNS = ["prompt_id", "candidate_id", "prompt", "candidate", "rank"]
LABEL_TEXT = st.sampled_from(["p0", "p1", "p9", "c0", "c1", "c2", "c7", "1", "2", "3", "0", "-1", " 2 ", "1.5", "",
                              "x" * 200_000]) | AWKWARD_TEXT


@st.composite
def label_files(draw) -> tuple[str, bytes, int]:
    """(suffix, bytes, lines + 1) of a labels file as `alignflow label import` reads it: the exported CSV with
    its rank column filled in (columns missing, extra or reordered; quotes, NUL, a 200,000-character field,
    not UTF-8) or JSONL/JSON rows {prompt_id, ranks} of any shape."""
    if draw(st.booleans()):
        columns = draw(st.permutations(LABEL_COLUMNS).flatmap(
            lambda cols: st.lists(st.sampled_from(cols + ["extra", ""]), min_size=0, max_size=6)))
        lines = [columns]
        for _ in range(draw(st.integers(0, 6))):
            lines.append(draw(st.lists(LABEL_TEXT, min_size=0, max_size=len(columns) + 1)))
        text = io.StringIO()
        csv.writer(text, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(lines)
        encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
        body = text.getvalue().encode(encoding, errors="replace")
        if draw(st.booleans()):
            body += draw(st.binary(max_size=40))  # a line of raw bytes at the end
        if draw(st.booleans()):
            body = codecs.BOM_UTF8 + body
        return ".csv", body, body.count(b"\n") + 2
    label = st.fixed_dictionaries({}, optional={"prompt_id": LABEL_TEXT | json_values,
                                                "ranks": st.dictionaries(LABEL_TEXT, st.integers(-1, 4) | json_values,
                                                                         max_size=4) | json_values})
    lines = []
    for kind in draw(st.lists(st.sampled_from(["label", "label", "label", "other", "bytes", "blank"]), min_size=1,
                              max_size=5)):
        if kind == "label":
            lines.append(_encode_line(draw(label), "utf-8"))
        elif kind == "other":
            lines.append(_encode_line(draw(json_values), "utf-8"))
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=40)).replace(b"\n", b""))
        else:
            lines.append(b"")
    return draw(st.sampled_from([".jsonl", ".json"])), b"\n".join(lines), len(lines) + 1


@settings(FUZZ, max_examples=100)
@given(label_files())
@example((".csv", b"prompt_id,candidate_id,rank\r\np1,c0,2\r\np1,c1,1\r\np0,c0,\r\n", 5))  # labels it can send
@example((".jsonl", b'{"prompt_id": "p1", "ranks": {"c0": 2, "c1": 1}}\n', 2))
def test_any_labels_file_gives_labels_or_one_label_error(case):
    """What `alignflow label import` reads before it resumes a run: labels it can send, or one LabelError (the
    error the command reports; anything else would end it with a traceback)."""
    suffix, body, n_lines = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"labels{suffix}"
        path.write_bytes(body)
        try:
            labels = read_label_file(str(path), LABELS_EXPECTED)
        except LabelError as err:
            _check_error(err, path, n_lines)
        else:
            for pid, ranks in labels.items():
                assert sorted(ranks) == sorted(LABELS_EXPECTED[pid])
                assert sorted(ranks.values()) == list(range(1, len(ranks) + 1))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(body).hexdigest()


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
                          "[" * 600,  # past the recursion limit (2000, as before, took PyYAML 5 s to get there)
                          "null", "~", "'x'", "&a [*a]", "9" * 5000, "{type: verifier, bogus: 1}",
                          "inf", "true", ""]) | AWKWARD_TEXT


def _names(message: str, key: str) -> bool:
    """The message names the key, or the dotted part of it where the fault is (`sft` of `sft.bogus.x`, the
    component `rank.ranker` of `rank.ranker.type`), as a location: not merely a substring of another word."""
    parts = key.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        for spelled in {prefix, repr(prefix)[1:-1]}:
            if re.search(r"(^|[\s'\"(])" + re.escape(spelled) + r"($|[\s'\".:\[\]])", message):
                return True
    return False


def test_the_key_check_tells_keys_apart():
    """The check below can fail: a message about another key, or a bare section name inside a word, is not
    naming the key."""
    assert _names("config: invalid config\n  sft.trainer.learning_rate: Input should be a number",
                  "sft.trainer.learning_rate")
    assert _names("config: invalid config\n  rank.ranker: Value error, unknown ranker 'x'", "rank.ranker.type")
    assert not _names("config: invalid config\n  dpo.trainer.beta: Input should be a number", "sft.trainer.beta")
    assert not _names("override 'seed': the value is not valid YAML", "see")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_any_config_override_gives_a_config_or_one_config_error(overrides):
    items = [f"{key}={value}" for key, value in overrides]
    before = copy.deepcopy(DEFAULT_TREE)
    try:
        config = validate_config(DEFAULT_TREE, source=str(SMOKE), overrides=items)
    except ConfigError as err:
        message = str(err)
        # the overrides at fault: those that fail on their own (none: the combination is at fault, all of them)
        at_fault = items if len(items) == 1 else [item for item in items if _fails(item)] or items
        assert any(_named(message, item) for item in at_fault), (at_fault, message)
    else:
        assert len(config.digest()) == 16  # a valid config can be hashed (its `config_hash` tag)
    assert DEFAULT_TREE == before  # the config tree given is left unchanged


@functools.lru_cache(maxsize=None)
def _fails(item: str) -> bool:
    try:
        validate_config(DEFAULT_TREE, source=str(SMOKE), overrides=[item])
    except ConfigError:
        return True
    return False


def _named(message: str, item: str) -> bool:
    """The message names the override's key; a key with an empty part has no name: the override is quoted."""
    key = item.partition("=")[0].strip()
    if any(not part.strip() for part in key.split(".")):
        return "expected dotted.key=value" in message and repr(item) in message
    return _names(message, key)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.sampled_from([b"\xff\xfe" + "a: 1".encode("utf-16-le"), b"[" * 600,
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
