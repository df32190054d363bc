"""Each stage alone on a tiny model, with a real MLflow store, asserting what it did."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from alignflow.config import BaseSection, LoraSection, RankSection, load_config
from alignflow.data.records import read_jsonl, write_jsonl
from alignflow.refs import DatasetRef, ModelRef, digest_path
from tasks.dpo import dpo
from tasks.evaluate import evaluate
from tasks.rank import rank
from tasks.sample import sample
from tasks.select_base import select_base
from tasks.sft import sft


def dataset_ref(rows, path) -> DatasetRef:
    write_jsonl(rows, path)
    return DatasetRef(uri=str(path), digest=digest_path(path), local_path=str(path))


def base_ref(path) -> ModelRef:
    return ModelRef(uri=path, digest=digest_path(path), local_path=path)


def child_run(ctx, stage):
    runs = MlflowClient().search_runs([ctx.experiment_id],
                                      f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' "
                                      f"and tags.`alignflow.stage` = '{stage}'")
    assert len(runs) == 1
    return runs[0]


def artifact_paths(run_id, path=""):
    client, out = MlflowClient(), []
    for item in client.list_artifacts(run_id, path):
        out += artifact_paths(run_id, item.path) if item.is_dir else [item.path]
    return out


@pytest.fixture
def sft_config(smoke_config):
    return smoke_config.sft.model_copy(update={"trainer": {**smoke_config.sft.trainer, "num_train_epochs": 2,
                                                           "logging_steps": 2}})


@pytest.fixture
def trainer_args_used(monkeypatch) -> list:
    """The TRL config of every trainer built from here on (alignflow.training.run.build_trainer), as it ran."""
    import alignflow.training.run as run

    used, build = [], run.build_trainer

    def recording(*args, **kwargs):
        trainer = build(*args, **kwargs)
        used.append(trainer.args)
        return trainer

    monkeypatch.setattr(run, "build_trainer", recording)
    return used


@pytest.fixture
def sft_model(sft_config, tiny_model_path, smoke_data, run_ctx, tmp_path):
    data = dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl")
    return sft.fn(sft_config, base_ref(tiny_model_path), data, run_ctx)


def test_sft_changes_weights_lowers_loss_and_records_everything(trainer_args_used, sft_model, tiny_model_path,
                                                                 run_ctx):
    before = load_file(f"{tiny_model_path}/model.safetensors")
    after = load_file(f"{sft_model.local_path}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert sft_model.digest == digest_path(sft_model.local_path)

    run = child_run(run_ctx, "sft")
    losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    # the params are what the trainer ran with, the per-device defaults resolved (bf16 off on CPU), not the YAML
    (used,) = trainer_args_used
    assert used.bf16 is False and used.use_cpu is True and used.learning_rate == 3e-3
    for key in ("bf16", "fp16", "use_cpu", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
                "seed", "logging_steps", "max_length"):
        assert run.data.params[f"sft.trainer.{key}"] == str(getattr(used, key)), key
    assert run.inputs.dataset_inputs[0].dataset.digest
    artifacts = artifact_paths(run.info.run_id)
    assert {"model/model.safetensors", "model/tokenizer.json", "model/chat_template.jinja"} <= set(artifacts)
    assert sft_model.uri == f"runs:/{run.info.run_id}/model"


def test_sft_lora_trains_an_adapter_only(sft_config, tiny_model_path, smoke_data, run_ctx, tmp_path):
    config = sft_config.model_copy(update={"lora": LoraSection(enabled=True, r=4, alpha=8)})
    data = dataset_ref(smoke_data["sft"][:64], tmp_path / "sft.jsonl")
    ref = sft.fn(config, base_ref(tiny_model_path), data, run_ctx)
    assert not (Path(ref.local_path) / "model.safetensors").exists()
    adapter = load_file(f"{ref.local_path}/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero


def test_sample_gives_n_candidates_per_prompt(smoke_config, sft_model, smoke_data, run_ctx, tmp_path):
    prompts = dataset_ref(smoke_data["prompts"][:10], tmp_path / "prompts.jsonl")
    ref = sample.fn(smoke_config.sample, sft_model, prompts, run_ctx)
    rows = read_jsonl(ref.resolve())
    assert len(rows) == 10
    assert all(len(r["candidates"]) == smoke_config.sample.num_candidates for r in rows)
    assert sum(len(r["candidates"]) for r in rows) == 10 * smoke_config.sample.num_candidates
    run = child_run(run_ctx, "sample")
    assert run.data.metrics["candidates"] == 40 and "candidates.jsonl" in artifact_paths(run.info.run_id)


def test_rank_builds_well_formed_pairs(run_ctx, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Reverse the word.\n\n{w}"}], "reference": w[::-1],
             "task": "reverse", "candidates": [w, w[::-1], "??", w[::-1]]} for w in ("lemon", "river")]
    rows.append({"prompt": [{"role": "user", "content": "x"}], "reference": "y", "task": "t",
                 "candidates": ["y", "y", "y", "y"]})  # a tie: dropped
    ref = rank.fn(RankSection(), dataset_ref(rows, tmp_path / "candidates.jsonl"), run_ctx)
    pairs = read_jsonl(ref.resolve())
    assert len(pairs) == 2
    for pair, row in zip(pairs, rows):
        assert set(pair) >= {"prompt", "chosen", "rejected", "margin"}
        assert pair["chosen"] == [{"role": "assistant", "content": row["reference"]}]
        assert pair["rejected"][0]["content"] == "??" and pair["margin"] > 0.5
    assert child_run(run_ctx, "rank").data.metrics["ties"] == 1


def test_reward_model_ranker_scores_with_a_sequence_classifier(tmp_path, tiny_model_path, run_ctx):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rows = [{"prompt": [{"role": "user", "content": "Say a word."}], "reference": None, "task": "all",
             "candidates": ["apple", "banana bread", "kite", "xylophone music"]}]
    ref = rank.fn(RankSection(ranker={"type": "reward_model", "model": str(tmp_path / "rm")}),
                  dataset_ref(rows, tmp_path / "c.jsonl"), run_ctx)
    (pair,) = read_jsonl(ref.resolve())
    assert pair["chosen_reward"] > pair["rejected_reward"]
    assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]


def test_dpo_changes_weights_and_logs_preference_metrics(smoke_config, sft_model, run_ctx, tmp_path):
    rows = []
    for i in range(16):
        word = f"lemon{i}"
        rows.append({"prompt": [{"role": "user", "content": f"Reverse the word.\n\n{word}"}],
                     "chosen": [{"role": "assistant", "content": word[::-1]}],
                     "rejected": [{"role": "assistant", "content": word}], "margin": 1.0, "task": "reverse"})
    config = smoke_config.dpo.model_copy(update={"trainer": {**smoke_config.dpo.trainer, "learning_rate": 1e-3,
                                                             "logging_steps": 1}})
    ref = dpo.fn(config, sft_model, dataset_ref(rows, tmp_path / "pairs.jsonl"), run_ctx)
    before = load_file(f"{sft_model.local_path}/model.safetensors")
    after = load_file(f"{ref.local_path}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    run = child_run(run_ctx, "dpo")
    history = MlflowClient().get_metric_history(run.info.run_id, "rewards/margins")
    assert history and history[-1].value > 0  # the policy now prefers the chosen answers
    assert "model/model.safetensors" in artifact_paths(run.info.run_id)


def test_select_base_picks_the_lower_loss_within_budget(tiny_model_path, smoke_data, run_ctx, tmp_path):
    from alignflow import embedded
    from tests.conftest import SMOKE

    spec = load_config(SMOKE).embedded
    other = embedded.model_path(spec, "embedded:tiny-xs")
    data = dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl")
    cfg = BaseSection(candidates=[other, tiny_model_path], score_examples=8)
    ref = select_base.fn(cfg, data, spec, LoraSection(), run_ctx)
    run = child_run(run_ctx, "select_base")
    table = MlflowClient().load_table(run.info.experiment_id, "candidates.json", run_ids=[run.info.run_id])
    chosen = table[table["chosen"]]
    assert len(table) == 2 and chosen["answer_bits_per_byte"].iloc[0] == table["answer_bits_per_byte"].min()
    assert run.data.tags["alignflow.selection_measure"] == "answer_bits_per_byte"
    assert ref.chat_template == chosen["chat_template"].iloc[0] and ref.chat_template.startswith("tmpl:")
    assert ref.uri == chosen["path"].iloc[0]

    tight = BaseSection(candidates=[other, tiny_model_path], memory_budget_gb=1e-9)
    with pytest.raises(ValueError, match="no base candidate fits"):
        select_base.fn(tight, data, spec, LoraSection(), run_ctx)


def test_evaluate_scores_every_model_on_the_same_prompts(smoke_config, tiny_model_path, smoke_data, run_ctx,
                                                         tmp_path):
    data = dataset_ref(smoke_data["eval"][:12], tmp_path / "eval.jsonl")
    models = {"base": base_ref(tiny_model_path), "again": base_ref(tiny_model_path)}
    results = evaluate.fn(smoke_config.eval, models, data, run_ctx)
    assert results["metrics"]["base"] == results["metrics"]["again"]  # greedy: same model, same answers
    metrics = child_run(run_ctx, "evaluate").data.metrics
    first_task = smoke_data["eval"][0]["task"]
    for key in ("base.accuracy", "base.mean_reward", "base.eos_rate", f"base.accuracy.{first_task}",
                "base.pass_at_8", f"base.pass_at_8.{first_task}", "base.accuracy_ci95_low", "base.accuracy_ci95_high"):
        assert key in metrics
    assert metrics["base.accuracy_ci95_low"] <= metrics["base.accuracy"] <= metrics["base.accuracy_ci95_high"]
    assert MlflowClient().get_run(run_ctx.parent_run_id).data.metrics["base.accuracy"] == metrics["base.accuracy"]


def test_tokenizer_without_chat_template_gets_one_that_stops(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    from alignflow.models.loading import load_tokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_path)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(tmp_path / "plain").chat_template
    tokenizer = load_tokenizer(str(tmp_path / "plain"))
    prompt = [{"role": "user", "content": "Reverse each word.\n\nlemon river"}]
    asked = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "nomel revir"}], tokenize=False)
    assert asked.endswith("### assistant:\n")
    assert full.startswith(asked) and full.rstrip().endswith("nomel revir" + tokenizer.eos_token)


def test_shared_prompt_sampling_matches_one_prompt_at_a_time(tiny_model_path, smoke_data):
    """Several samples per prompt share one prefill of the prompt (left-padded batch of different
    lengths); greedy decoding shows it continues exactly where a plain generate would."""
    from alignflow.models.generate import generate
    from alignflow.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_path, "cpu"), load_tokenizer(tiny_model_path)
    prompts = [r["prompt"] for r in smoke_data["eval"][:6]]
    assert len({len(str(p)) for p in prompts}) > 1
    one = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=6)
    shared = generate(model, tokenizer, prompts, num_return_sequences=3, max_new_tokens=8, batch_size=6)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0][0]["text"] for p in prompts]
    assert [[c["text"] for c in cands] for cands in shared] == [[a["text"]] * 3 for [a] in one]
    assert [a["text"] for [a] in one] == alone
