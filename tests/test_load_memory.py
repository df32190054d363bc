"""Load (issue 15, case 10), the small version of bench/load.py (whose 1,000,000-row figures are in
docs/load.md): converting an SFT file streams, so peak memory does not grow with the file, and the
converted file is the one the materialising reader writes."""

import json
import sys

import pytest

from bench.load import VARIANT, make_file
from tests.conftest import ROOT, run_in_session


def convert(variant: str, src, out) -> dict:
    code = VARIANT.format(root=str(ROOT), src=str(src), out=str(out), variant=variant)
    done = run_in_session([sys.executable, "-c", code], timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a server or a subprocess: the full suite's tier
def test_streaming_conversion_memory_does_not_grow_with_the_file(tmp_path):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    make_file(small, 10_000)
    make_file(large, 200_000)  # 20x the rows, ~25 MiB of JSONL
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    few = convert("streaming", small, tmp_path / "a" / "out.jsonl")
    many = convert("streaming", large, tmp_path / "b" / "out.jsonl")
    whole = convert("materialised", large, tmp_path / "c" / "out.jsonl")
    assert many["rows"] == whole["rows"] == 200_000 and many["digest"] == whole["digest"]
    streaming_growth = many["peak_rss_mb"] - few["peak_rss_mb"]
    materialised_growth = whole["peak_rss_mb"] - few["peak_rss_mb"]
    assert streaming_growth < 16, (few, many)  # bounded: the rows are not held
    assert materialised_growth > 5 * max(streaming_growth, 1), (whole, many)  # what the old reader paid
