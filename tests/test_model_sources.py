"""Model sources under faults (issue 15, cases 8 and 11).

Case 11: a base candidate that cannot be reached (hub offline or unknown
id, missing local directory, unreadable GGUF file, a directory without safetensors weights) is skipped
with one line naming it and the reason; the reachable ones still compete, and the selection table
says which were skipped and why. All unreachable: the stage fails with that table.

Case 8: a directory whose weights are only pickles is refused before anything is unpickled, unless
base.allow_pickle_weights converts it (once) to safetensors; no stage then loads a pickle."""

from pathlib import Path

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


@pytest.fixture
def pickled_model(tiny_model_path, tmp_path):
    """The tiny model as an old checkpoint would ship it: pytorch_model.bin (a pickle), no safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_path, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return str(folder), weights


def test_pickle_only_weights_are_refused_unless_allowed(pickled_model, smoke_data, run_ctx, tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    from alignflow.models.loading import UnsafeWeights, load_causal_lm

    folder, weights = pickled_model
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in Path(folder).iterdir()}
    with pytest.raises(UnsafeWeights, match=r"pickled: only pickle weights \(pytorch_model.bin\).*allow_pickle"):
        load_causal_lm(folder, "cpu")

    spec = load_config(SMOKE).embedded
    data = dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl")
    with pytest.raises(ValueError, match="pickled: skipped: UnsafeWeights: .*only pickle weights"):
        select_base.fn(BaseSection(candidates=[folder], score_examples=4), data, spec, LoraSection(), run_ctx)

    allowed = BaseSection(candidates=[folder], score_examples=4, allow_pickle_weights=True)
    ref = select_base.fn(allowed, data, spec, LoraSection(), run_ctx)
    converted = Path(ref.local_path)
    assert ref.uri == str(converted) and converted != Path(folder)  # later stages (other machines too) load this
    assert not [f.name for f in converted.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
    saved = load_file(converted / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in weights.items() if k in saved)
    assert len(saved) >= len(weights) - 1  # the tied LM head may be saved once
    assert before == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in Path(folder).iterdir()}
    model = load_causal_lm(str(converted), "cpu")  # what the SFT stage does with the chosen base
    assert model.num_parameters() > 0
