"""Over-length rows (issue 15, case 7): rows longer than the trainer's max_length are counted and
reported, then truncated by TRL or dropped as configured, never silently; a row whose prompt alone
fills max_length is dropped either way (no answer token would be left to learn from); the loss stays
finite and pad stays distinct from EOS."""

import hashlib
import logging
import math

import pytest
from mlflow.tracking import MlflowClient

from alignflow.models.loading import load_tokenizer
from alignflow.training.trainers import fit_to_length
from tasks.sft import sft
from tests.test_stages import base_ref, child_run, dataset_ref

MAX_LENGTH = 96


def long_rows(smoke_data):
    """The smoke SFT rows, two with a long answer and one with a prompt that fills max_length alone."""
    rows = [dict(r) for r in smoke_data["sft"][:40]]
    rows[3] = {**rows[3], "completion": [{"role": "assistant", "content": "word " * 200}]}
    rows[10] = {**rows[10], "completion": [{"role": "assistant", "content": "other " * 120}]}
    rows[20] = {**rows[20], "prompt": [{"role": "user", "content": "prompt " * 200}]}
    return rows


@pytest.mark.parametrize("overlength", ["truncate", "drop"])
def test_overlength_rows_are_counted_reported_and_handled(overlength, smoke_config, tiny_model_path, smoke_data,
                                                         run_ctx, tmp_path, caplog):
    rows = long_rows(smoke_data)
    tokenizer = load_tokenizer(tiny_model_path)
    kept, report = fit_to_length(rows, tokenizer, "sft", MAX_LENGTH, "keep_start", overlength)
    assert report["overlength"] == 3 and report["examples"] == [4, 11, 21]  # row numbers, 1-based
    assert report["dropped"] == (3 if overlength == "drop" else 1)  # the prompt-filled row always goes
    assert len(kept) == 40 - report["dropped"]

    data = dataset_ref(rows, tmp_path / "sft.jsonl")
    before = hashlib.sha256((tmp_path / "sft.jsonl").read_bytes()).hexdigest()
    cfg = smoke_config.sft.model_copy(update={
        "overlength": overlength,
        "trainer": {**smoke_config.sft.trainer, "max_length": MAX_LENGTH, "num_train_epochs": 1, "logging_steps": 1}})
    with caplog.at_level(logging.WARNING, logger="alignflow"):
        ref = sft.fn(cfg, base_ref(tiny_model_path), data, run_ctx)
    assert hashlib.sha256((tmp_path / "sft.jsonl").read_bytes()).hexdigest() == before  # the input untouched
    warning = next(r.getMessage() for r in caplog.records if "longer than max_length" in r.getMessage())
    assert "3 of 40 rows are longer than max_length 96 tokens" in warning and "rows 4, 11, 21" in warning

    run = child_run(run_ctx, "sft")
    metrics = run.data.metrics
    assert metrics["data.overlength_rows"] == 3 and metrics["data.dropped_rows"] == report["dropped"]
    assert metrics["data.rows"] == 40 and metrics["data.max_tokens"] > MAX_LENGTH
    assert run.data.params["sft.overlength"] == overlength
    losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert losses and all(math.isfinite(x) for x in losses)  # no NaN from a row with no answer left

    trained = load_tokenizer(ref.local_path)
    assert trained.pad_token_id != trained.eos_token_id  # pad distinct from EOS: the answer's end is learnt


def test_a_dataset_with_no_row_that_fits_fails_naming_max_length(smoke_config, tiny_model_path, smoke_data,
                                                                run_ctx, tmp_path):
    rows = [{**r, "prompt": [{"role": "user", "content": "prompt " * 200}]} for r in smoke_data["sft"][:4]]
    cfg = smoke_config.sft.model_copy(update={"trainer": {**smoke_config.sft.trainer, "max_length": MAX_LENGTH}})
    with pytest.raises(ValueError, match="sft: no row fits max_length 96 tokens"):
        sft.fn(cfg, base_ref(tiny_model_path), dataset_ref(rows, tmp_path / "sft.jsonl"), run_ctx)
    assert child_run(run_ctx, "sft").info.status == "FAILED"


def test_preference_pairs_are_measured_by_their_longer_answer(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path)
    prompt = [{"role": "user", "content": "Say hi."}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "hi"}],
            "rejected": [{"role": "assistant", "content": "no " * 100}]}
    kept, report = fit_to_length([pair], tokenizer, "dpo", MAX_LENGTH, "keep_start", "drop")
    assert (kept, report["overlength"], report["dropped"]) == ([], 1, 1)
    kept, report = fit_to_length([pair], tokenizer, "rft", MAX_LENGTH, "keep_start", "drop")  # chosen only
    assert (kept, report["overlength"]) == ([pair], 0)
