"""Reading and writing rows of JSON, JSONL and Parquet files, streamed, with errors that name the file,
row and field (DataError): what every reader of user data builds on.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterator

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


MAX_PROBLEM = 400  # characters of a DataError's problem: a quoted row or value is cut, not printed whole


class DataError(ValueError):
    def __init__(self, source: str, problem: str, row: int | None = None, field: str | None = None):
        where = source + (f": row {row}" if row is not None else "") + (f": field '{field}'" if field else "")
        problem = " ".join(problem.split())  # one line, however long or odd the value it quotes
        if len(problem) > MAX_PROBLEM:
            problem = problem[:MAX_PROBLEM - 1] + "…"
        super().__init__(f"{where}: {problem}")
        self.source, self.problem, self.row, self.field = source, problem, row, field


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


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
