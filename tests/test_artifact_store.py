"""An artifact store that cannot be written (issue 15, case 2): the stage fails with an error naming the
path, its MLflow run is FAILED, the trained model is kept in the stage directory, and the rerun uploads
it without training again."""

from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from alignflow.refs import digest_path
from tasks.sft import sft
from tests.test_stages import artifact_paths, base_ref, dataset_ref


@contextmanager
def unwritable(folder: Path):
    """`folder` made unwritable for everyone, root included: a regular file stands where the directory was,
    so every mkdir beneath it fails with NotADirectoryError, whatever the process may do with permission
    bits or file attributes. The directory, with what it held, is put back afterwards."""
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    folder.write_text("a file where the artifact store's directory should be\n")
    try:
        yield
    finally:
        folder.unlink()
        aside.rename(folder)


def test_unwritable_artifact_store_fails_naming_the_path_and_the_rerun_uploads(smoke_config, tiny_model_path,
                                                                             smoke_data, tmp_path):
    from alignflow.tracking import RunContext

    store = tmp_path / "artifact-store"
    store.mkdir()
    experiment = mlflow.create_experiment("unwritable", artifact_location=store.as_uri())
    with mlflow.start_run(experiment_id=experiment) as parent:
        ctx = RunContext(experiment_id=experiment, parent_run_id=parent.info.run_id, output_dir=str(tmp_path / "out"),
                         config_hash="test", seed=0, device="cpu", stage_root=str(tmp_path / "stages"))
        data = dataset_ref(smoke_data["sft"][:32], tmp_path / "sft.jsonl")
        cfg = smoke_config.sft.model_copy(update={"trainer": {**smoke_config.sft.trainer, "num_train_epochs": 1,
                                                              "logging_steps": 1}})
        with unwritable(store):
            with pytest.raises(OSError) as failed:
                sft.fn(cfg, base_ref(tiny_model_path), data, ctx, cache_key="k" * 32)
        assert str(store) in str(failed.value)  # the error names where it could not write

        client = MlflowClient()
        first = client.search_runs([experiment], "tags.`alignflow.stage` = 'sft'")[0]
        assert first.info.status == "FAILED"
        model_dir = tmp_path / "stages" / f"sft-{'k' * 16}" / "model"
        kept = load_file(model_dir / "model.safetensors")  # the trained model stayed on local disk
        digest = digest_path(model_dir)

        ref = sft.fn(cfg, base_ref(tiny_model_path), data, ctx, cache_key="k" * 32)
        runs = client.search_runs([experiment], "tags.`alignflow.stage` = 'sft'", order_by=["start_time ASC"])
        rerun = runs[-1]
        assert len(runs) == 2 and rerun.info.status == "FINISHED"
        assert "loss" not in rerun.data.metrics  # not trained again
        assert "model/model.safetensors" in artifact_paths(rerun.info.run_id)  # uploaded this time
        assert ref.digest == digest
        uploaded = load_file(Path(mlflow.artifacts.download_artifacts(ref.uri)) / "model.safetensors")
        assert all(torch.equal(uploaded[k], kept[k]) for k in kept)
