"""`alignflow validate` rejects what `alignflow run` rejects before any model loads, with the same
message: each bad config goes through both commands."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.cli import main
from tests.conftest import SMOKE

pytestmark = pytest.mark.slow

BAD = [  # (overrides, what the error must name)
    (["sft.trainer.lerning_rate=0.1"], "lerning_rate"),  # not a field of TRL's SFTConfig
    (["sft.trainer.lr_scheduler_type=sideways"], "sideways"),  # a field TRL rejects the value of
    (["dpo.trainer.loss_weights=[1.0, 2.0, 3.0]"], "dpo.trainer"),  # one weight per loss type
    (["rank.ranker=oracle"], "unknown ranker 'oracle'"),
    (["rank.ranker={type: reward_model, model: rm, batch_sise: 8}"], "batch_sise"),
    (["rank.pairs=widest"], "unknown pair strategy 'widest'"),
    (["sample.engine={type: transformers, batch: 3}"], "batch"),
    (["dpo.baselines=[ppo]"], "dpo.baselines"),
    (["sft.data.path=no/such/file.jsonl"], "no/such/file.jsonl"),
    (["sample.prompts.path=embedded:nonesuch"], "nonesuch"),
    (["base.candidates=[embedded:tiny-xl]"], "tiny-xl"),
]
if not torch.cuda.is_available():
    BAD.append((["device=cuda"], "CUDA"))


@pytest.mark.parametrize("overrides, named", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_validate_rejects_what_run_rejects(overrides, named, prefect_server, tmp_path, capsys):
    experiment = f"bad-{abs(hash(tuple(overrides)))}"
    common = [f"output_dir={tmp_path / 'out'}", f"experiment={experiment}"]
    assert main(["validate", str(SMOKE), *overrides, *common]) == 2
    validated = capsys.readouterr().err
    assert named in validated
    assert main(["run", str(SMOKE), *overrides, *common]) == 2
    ran = capsys.readouterr().err
    assert named in ran
    assert validated.strip().splitlines()[-1] == ran.strip().splitlines()[-1]  # the same words
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    # nothing but the input check ran, and nothing is marked successful
    assert {r.data.tags.get("alignflow.stage", "parent") for r in runs} <= {"parent", "load_data"}
    assert all(r.info.status == "FAILED" for r in runs)


def test_a_good_config_validates_without_writing(tmp_path, capsys):
    assert main(["validate", str(SMOKE), f"output_dir={tmp_path / 'out'}"]) == 0
    assert "valid" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
