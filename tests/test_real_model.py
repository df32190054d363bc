"""A real pretrained model through alignflow: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

Small step counts; the traps a real model sets and the tiny test Llamas hide: its own chat template
(with a default system prompt) used at every stage, pad == EOS, LoRA target modules of a real
architecture, DPO on top of a LoRA SFT, loss on the answer only, generation that stops at the
template's end of turn, memory. Marked `real_model` (about 5 minutes in all); `make test` runs them.
"""

import json
import resource
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from alignflow import embedded
from alignflow.config import load_config
from alignflow.models import gguf
from alignflow.models.generate import stop_token_ids
from alignflow.models.loading import load_causal_lm, load_tokenizer
from alignflow.models.templates import ChatTemplateMismatch, template_fingerprint
from alignflow.refs import ModelRef, digest_path
from tests.conftest import ROOT
from tests.test_lora_stack import changed
from tests.test_stages import dataset_ref

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
CONFIG = ROOT / "configs" / "smollm2-135m.yaml"
LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_gguf_becomes_a_safetensors_model_with_the_same_outputs(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = json.loads((smollm2_dir / gguf.SOURCE_FILE).read_text())
    gguf_file = gguf.packaged_file("smollm2-135m")
    assert source["sha256"] == gguf.file_digest(gguf_file)
    files = {p.name for p in smollm2_dir.iterdir()}
    assert "model.safetensors" in files and not {f for f in files if f.endswith((".bin", ".pt", ".pkl"))}
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    converted = load_causal_lm(str(smollm2_dir), "cpu")
    assert 130e6 < sum(p.numel() for p in converted.parameters()) < 140e6
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ids = tokenizer("Backwards, lemon river reads", return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(converted(**ids).logits, direct(**ids).logits)
    # its own tokenizer and template came along: 49k tokens, ChatML with SmolLM's default system prompt
    ours = load_tokenizer(str(smollm2_dir))
    assert len(ours) == len(tokenizer) > 40000 and ours.chat_template == tokenizer.chat_template
    assert template_fingerprint(ours) == template_fingerprint(tokenizer)
    # the cache key pins the packaged file's content; a bare name is a hub id, not the packaged model
    from alignflow.pins import Uncacheable, model_source

    assert model_source("embedded:smollm2-135m") == "sha256:" + source["sha256"]
    with pytest.raises(Uncacheable):
        model_source("smollm2-135m")
    # converted once: the same directory, not rebuilt
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    again = Path(embedded.resolve(load_config(CONFIG).embedded, str(gguf_file), "model"))
    assert again == smollm2_dir and (again / "model.safetensors").stat().st_mtime_ns == stamp


def test_sft_batches_train_on_the_answer_and_its_end_of_turn_only(smollm2_dir, smoke_data, tmp_path):
    """pad == EOS (<|im_end|>) here: the end of turn must still be a label, the prompt (system line
    included) never."""
    from alignflow.training.args import trainer_args
    from alignflow.training.trainers import sft_trainer

    tokenizer = load_tokenizer(str(smollm2_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = smoke_data["sft"][:2]
    args = trainer_args({"max_length": 256}, "cpu", 0, tmp_path, 0)
    trainer = sft_trainer(load_causal_lm(str(smollm2_dir), "cpu"), tokenizer, rows, args)
    for example, row in zip(trainer.train_dataset, rows):
        ids, labels = example["input_ids"], example["labels"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids[:first])
        assert all(label == -100 for label in labels[:first])
        assert tokenizer.decode([t for t in labels if t != -100]) == row["completion"][0]["content"] + "<|im_end|>\n"
    examples = [trainer.train_dataset[0], trainer.train_dataset[1]]
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"])  # so the batch is padded
    batch = trainer.data_collator(examples)
    for labels, example in zip(batch["labels"], examples):
        kept = labels[labels != -100].tolist()
        # exactly the answer's tokens, padding excluded: the end of turn is learned although it is
        # also the padding token
        assert kept == [t for t in example["labels"] if t != -100]
        assert tokenizer.eos_token_id in kept


def test_template_mismatch_fails_before_any_weights_load(smollm2_dir, smoke_data, run_ctx, tmp_path, monkeypatch):
    import alignflow.models.loading
    import tasks.dpo as dpo_module

    monkeypatch.setattr(alignflow.models.loading, "load_causal_lm", lambda *a, **k: pytest.fail("weights loaded"))
    policy = ModelRef(uri=str(smollm2_dir), local_path=str(smollm2_dir), digest=digest_path(smollm2_dir),
                      chat_template=template_fingerprint(load_tokenizer(str(smollm2_dir))))
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "x"}]}
            for r in smoke_data["prompts"][:4]]
    pairs = dataset_ref(rows, tmp_path / "pairs.jsonl").model_copy(update={"chat_template": "tmpl:0123456789ab"})
    cfg = load_config(CONFIG).dpo
    with pytest.raises(ChatTemplateMismatch) as err:
        dpo_module.dpo.fn(cfg, policy, pairs, run_ctx)
    assert policy.chat_template in str(err.value) and "tmpl:0123456789ab" in str(err.value)


def test_the_smollm2_recipe_end_to_end(prefect_server, smollm2_dir, tmp_path):
    """configs/smollm2-135m.yaml, shrunk: LoRA SFT -> sampling -> ranking -> LoRA DPO -> evaluation ->
    registry. DPO runs at learning rate 0, so its model must hold the SFT model's weights and answer exactly
    like it (the issue's bug: a LoRA DPO on a LoRA SFT reloaded as base + DPO and answered like the base).
    That a real learning rate's update reaches the saved weights is checked on the tiny models
    (tests/test_lora_stack.py), where it costs seconds."""
    from flows.pipeline import align

    config = load_config(CONFIG, [
        f"output_dir={tmp_path / 'out'}", "experiment=smollm2-test", "embedded.sft_examples=96",
        "embedded.prompt_examples=8", "embedded.eval_examples=20", "base.score_examples=8",
        "sft.trainer.max_steps=24", "sft.trainer.per_device_train_batch_size=4", "sft.checkpoint_steps=0",
        "sample.max_new_tokens=16", "dpo.trainer.learning_rate=0.0", "dpo.trainer.max_steps=2",
        "dpo.trainer.per_device_train_batch_size=4", "eval.pass_k=0", "eval.max_new_tokens=16",
        "eval.bootstrap=100", "eval.samples_logged=20"])
    results = align(config)
    client = MlflowClient()
    parent = client.get_run(results["parent_run_id"])
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags["alignflow.stage"]: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert all(run.info.status == "FINISHED" for run in stages.values())

    # the tokenizer's own template (not alignflow's fallback), the same at every stage
    own = template_fingerprint(load_tokenizer(str(smollm2_dir)))
    for stage in ("select_base", "sft", "sample", "rank", "dpo"):
        assert stages[stage].data.tags["alignflow.chat_template"] == own, stage
    for model in ("base", "sft", "dpo"):
        assert stages["evaluate"].data.tags[f"alignflow.chat_template.{model}"] == own

    # SFT: finite, falling loss; LoRA on every Llama projection, never the LM head or embeddings
    sft = stages["sft"]
    losses = [m.value for m in client.get_metric_history(sft.info.run_id, "loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert set(json.loads(sft.data.params["sft.lora.resolved_targets"].replace("'", '"'))) == LLAMA_PROJECTIONS
    adapter = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{sft.info.run_id}/model/adapter_config.json")).read_text())
    assert set(adapter["target_modules"]) == LLAMA_PROJECTIONS

    # DPO on the LoRA SFT: saved merged, full weights, no adapter and no pickle (its weights: below)
    dpo_files = {a.path.split("/")[-1] for a in client.list_artifacts(stages["dpo"].info.run_id, "model")}
    assert "model.safetensors" in dpo_files and not {"adapter_config.json", "training_args.bin"} & dpo_files

    samples = client.load_table(parent.info.experiment_id, "eval_samples.json", run_ids=[stages["evaluate"].info.run_id])
    answers = {name: list(group.sort_values("prompt")["answer"]) for name, group in samples.groupby("model")}
    assert answers["dpo"] == answers["sft"]  # learning rate 0: DPO changed nothing, and nothing was lost
    assert answers["sft"] != answers["base"]  # so the equality above could tell SFT from base
    metrics = parent.data.metrics
    assert metrics["sft.eos_rate"] >= 0.9  # the SFT model stops at its end of turn
    assert not any("<|im_end|>" in a or "<|im_start|>" in a for a in answers["sft"])
    tokenizer = load_tokenizer(str(smollm2_dir))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, load_causal_lm(
        str(smollm2_dir), "cpu"))

    # the registry's champion is that model: at learning rate 0 its weights are the SFT adapter merged into the
    # base, every tensor exactly, and it answers like SFT
    champion = mlflow.pyfunc.load_model("models:/smollm2-test-dpo@champion").unwrap_python_model()
    eval_rows = [json.loads(line) for line in Path(config.output_dir, parent.info.run_id, "data", "eval.jsonl")
                 .read_text().splitlines()]
    prompts = [r["prompt"] for r in eval_rows[:4]]
    from alignflow.models.generate import generate

    # the LoRA adapter merged on load, on the device (and in the dtype) the champion and the stages load models in
    sft_model = load_causal_lm(results_model_dir(stages["sft"]), champion.device)
    assert changed(sft_model.state_dict(), champion.model.state_dict()) == []
    expect = [a[0]["text"] for a in generate(sft_model, tokenizer, prompts, max_new_tokens=16)]
    got = [a[0]["text"] for a in generate(champion.model, champion.tokenizer, prompts, max_new_tokens=16)]
    assert got == expect

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, this whole test process
    assert peak_gb < 24, f"peak RSS {peak_gb:.1f} GiB"


def results_model_dir(stage_run) -> str:
    return mlflow.artifacts.download_artifacts(f"runs:/{stage_run.info.run_id}/model")
