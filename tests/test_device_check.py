"""bench/device_check.sh, the GPU check, in its CPU dry run: the same SFT, sampling, DPO and GRPO code paths on
tiny models, without Prefect, MLflow or pydantic (the GPU image has none of them)."""

import json

import pytest

from tests.conftest import ROOT, run_in_session

pytestmark = pytest.mark.slow


def test_dry_run_measures_every_path_and_writes_its_figures(tmp_path):
    out = tmp_path / "figures.json"
    # in a session of its own: past the timeout the accelerate ranks it launched are stopped with it
    done = run_in_session(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run", str(out)], timeout=600,
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["dry_run"] and set(figures["archs"]) == {"llama", "qwen2"}
    for arch, entry in figures["archs"].items():
        for path in ("alignflow", "trl_defaults"):
            assert entry[f"sft.{path}"]["tokens_per_s"] > 0, arch
            assert entry[f"sample.{path}"]["tokens_per_s"] > 0, arch
            assert entry[f"dpo.{path}"]["pairs_per_s"] > 0, arch
            assert {"attn_implementation", "bf16", "padding_free", "use_liger_kernel"} <= set(
                entry[f"sft.{path}"]["active"])
        assert entry["sft.trl_defaults"]["active"]["gradient_checkpointing"]  # TRL's default, kept there
        assert not entry["sft.alignflow"]["active"]["gradient_checkpointing"]  # alignflow's CPU default
        grpo = entry["grpo.alignflow"]  # the grpo stage's trainer, generating with transformers here
        assert grpo["steps_per_s"] > 0 and grpo["generation"] == "transformers", arch
    launched = figures["archs"]["llama"]["sft.launched"]  # the multi-GPU launch, as 2 CPU ranks
    assert "error" not in launched, launched.get("error")
    assert (launched["world_size"], launched["distributed_type"]) == (2, "MULTI_CPU")
    assert launched["tokens_per_s"] > 0 and launched["scaling_vs_one_process"] > 0
    resolved = figures["cuda_defaults"]
    assert resolved["sft"]["bf16"] and resolved["sft"]["torch_compile"] is False
    assert "ratio alignflow / TRL defaults" in done.stdout
