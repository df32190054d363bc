"""Case 11 of the reliability matrix: a base candidate that cannot be reached (hub offline or unknown
id, missing local directory, unreadable GGUF file, a directory without safetensors weights) is skipped
with one line naming it and the reason; the reachable ones still compete, and the selection table
says which were skipped and why. All unreachable: the stage fails with that table."""

import pytest
from mlflow.tracking import MlflowClient

from alignflow.config import BaseSection, LoraSection, load_config
from tasks.select_base import select_base
from tests.conftest import SMOKE
from tests.test_stages import child_run, dataset_ref


@pytest.fixture
def unreachable(tmp_path):
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00\x01" * 64)  # the magic, then nothing a GGUF reader can use
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    # each with a word its reason must hold
    return {"Qwen/Qwen2.5-0.5B": "LocalEntryNotFoundError", str(tmp_path / "no-such-dir"): "no such directory",
            str(garbage): "GGUF v", str(no_weights): "model_type"}


def test_unreachable_candidates_are_skipped_and_named(unreachable, tiny_model_path, smoke_data, run_ctx, tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_config(SMOKE).embedded
    data = dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl")
    cfg = BaseSection(candidates=[*unreachable, tiny_model_path], score_examples=4)
    ref = select_base.fn(cfg, data, spec, LoraSection(), run_ctx)
    assert ref.local_path == tiny_model_path  # the reachable one still competes, and wins
    run = child_run(run_ctx, "select_base")
    table = MlflowClient().load_table(run.info.experiment_id, "candidates.json", run_ids=[run.info.run_id])
    assert len(table) == len(unreachable) + 1
    skipped = dict(zip(table["candidate"], table["skipped"]))
    assert skipped[tiny_model_path] == ""
    for name, word in unreachable.items():
        reason = skipped[name]
        assert word in reason and "\n" not in reason and len(reason) <= 300, (name, reason)
    assert list(table["chosen"]) == [False] * len(unreachable) + [True]

    with pytest.raises(ValueError, match="no base candidate could be loaded") as failed:
        select_base.fn(BaseSection(candidates=list(unreachable)), data, spec, LoraSection(), run_ctx)
    lines = str(failed.value).splitlines()[1:]
    assert [line.split(": skipped: ")[0].strip() for line in lines] == list(unreachable)


def test_preflight_stops_a_run_whose_candidates_are_all_missing_files(tmp_path):
    from alignflow.config import validate_config
    from tasks.select_base import check

    tree = load_config(SMOKE).model_dump(mode="json")
    missing = [str(tmp_path / "gone.gguf"), str(tmp_path / "gone-dir")]
    with pytest.raises(ValueError, match="none can be found: .*gone.gguf: no such file"):
        check(validate_config(tree, overrides=[f"base.candidates={missing}"]), "cpu", tmp_path)
    check(validate_config(tree, overrides=[f"base.candidates={missing + ['Qwen/Qwen2.5-0.5B']}"]), "cpu", tmp_path)
