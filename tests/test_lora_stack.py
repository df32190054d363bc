"""A DPO output reloads as SFT + DPO, whatever mix of full and LoRA tuning made it.

With a zero learning rate DPO changes nothing, so the DPO model must hold the very weights of the SFT
model it started from and answer exactly like it, and so must the registry's champion loaded back
through MLflow. A LoRA DPO adapter that forgot the LoRA SFT beneath it answers like the base model
instead (issue 10). With a real learning rate the same LoRA DPO on the LoRA SFT must save weights of
its own: the adapted projections moved, everything else the SFT model's (a DPO update dropped on the way
to disk would pass every zero-rate check).
"""

from pathlib import Path

import mlflow
import pytest
import torch

from alignflow.config import LoraSection, RegistrySection
from alignflow.models.generate import generate
from alignflow.models.loading import load_causal_lm, load_tokenizer
from tasks.dpo import dpo
from tasks.promote import promote
from tasks.sft import sft
from tests.test_stages import base_ref, dataset_ref

pytestmark = pytest.mark.slow
MAX_NEW = 64  # the registered model's default answer length
# two steps at it move the LoRA SFT model's first-token logits by 0.08 to 0.56 (0.56 here, 0.078 in a CI run:
# machines differ); its greedy text is no measure here: the tiny LoRA SFT model answers with a run of dots,
# which flips to other text or not erratically as the rate varies
LEARNING_LORA_DPO = 5e-2
# the zero-rate runs match the SFT model to 1e-4; a trained adapter must move some logit a hundred times that
MOVED_LOGIT = 1e-2


def answers(path: str, prompts: list) -> list[str]:
    model, tokenizer = load_causal_lm(path, "cpu"), load_tokenizer(path)
    return [a[0]["text"] for a in generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW)]


@torch.inference_mode()
def next_token_logits(model, tokenizer, prompts: list) -> torch.Tensor:
    """The first answer token's logits for each prompt: finer than greedy text, which a weak model
    may leave empty for base and SFT alike."""
    rows = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        rows.append(model(input_ids=ids).logits[0, -1].float())
    return torch.stack(rows)


def logits_of(path: str, prompts: list) -> torch.Tensor:
    return next_token_logits(load_causal_lm(path, "cpu"), load_tokenizer(path), prompts)


def weights(path: str) -> dict[str, torch.Tensor]:
    """A model directory's weights as every stage loads it: full weights, or a LoRA adapter merged into its base."""
    return load_causal_lm(path, "cpu").state_dict()


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys()
    return [name for name in before if not torch.equal(before[name], after[name])]


@pytest.fixture(scope="module")
def pairs_rows(smoke_data):
    return [{"prompt": r["prompt"], "chosen": r["completion"], "task": r["task"],
             "rejected": [{"role": "assistant", "content": "no idea"}], "margin": 1.0}
            for r in smoke_data["prompts"][:16]]


def evaluation(sft_answers: list[str], dpo_answers: list[str], n: int) -> dict:
    """What promote reads of an evaluation: the challenger's correctness and both models' health measures
    (alignflow.health) of their answers."""
    from alignflow.health import answer_health

    health = lambda texts: answer_health([{"text": t, "ended": True, "tokens": len(t.split())}  # noqa: E731
                                          for t in texts])
    return {"correct": {"dpo": [0.0] * n}, "metrics": {"sft": health(sft_answers), "dpo": health(dpo_answers)}}


@pytest.mark.parametrize("sft_lora", [False, True], ids=["full-sft", "lora-sft"])
def test_zero_lr_dpo_answers_like_sft_and_so_does_the_champion(sft_lora, smoke_config, tiny_model_path,
                                                                smoke_data, pairs_rows, run_ctx, tmp_path):
    lora = LoraSection(enabled=True, r=8, alpha=16, dropout=0.0)
    sft_cfg = smoke_config.sft.model_copy(update={
        "lora": lora if sft_lora else LoraSection(),
        "trainer": {**smoke_config.sft.trainer, "num_train_epochs": 2,
                    "learning_rate": 2e-2 if sft_lora else 3e-3}})  # LoRA needs a higher rate to move answers
    base = base_ref(tiny_model_path)
    sft_model = sft.fn(sft_cfg, base, dataset_ref(smoke_data["sft"], tmp_path / "sft.jsonl"), run_ctx)
    assert (Path(sft_model.local_path) / "adapter_config.json").exists() == sft_lora

    prompts = [r["prompt"] for r in smoke_data["eval"] if len(r["prompt"]) == 1][:12]
    sft_answers, sft_logits = answers(sft_model.local_path, prompts), logits_of(sft_model.local_path, prompts)
    sft_weights = weights(sft_model.local_path)  # a LoRA SFT merged into its base, as DPO loads its policy
    # else "like SFT" could not tell SFT from base
    assert (sft_logits - logits_of(tiny_model_path, prompts)).abs().max() > 0.1

    pairs = dataset_ref(pairs_rows, tmp_path / "pairs.jsonl")
    for dpo_lora in (False, True):
        dpo_cfg = smoke_config.dpo.model_copy(update={
            "lora": lora if dpo_lora else LoraSection(),
            "trainer": {**smoke_config.dpo.trainer, "learning_rate": 0.0, "max_steps": 2}})
        name = f"dpo-{'lora' if dpo_lora else 'full'}"
        dpo_model = dpo.fn(dpo_cfg, sft_model, pairs, run_ctx, name=name)
        # saved merged into the policy it started from: self-contained full weights, the SFT model's exactly
        assert (Path(dpo_model.local_path) / "model.safetensors").exists()
        assert not (Path(dpo_model.local_path) / "adapter_config.json").exists()
        assert changed(sft_weights, weights(dpo_model.local_path)) == [], name
        dpo_answers = answers(dpo_model.local_path, prompts)
        assert dpo_answers == sft_answers, name
        torch.testing.assert_close(logits_of(dpo_model.local_path, prompts), sft_logits, atol=1e-4, rtol=1e-4)

        registered = f"stack-{int(sft_lora)}{int(dpo_lora)}"
        # the tiny SFT model answers by repeating itself, so the absolute repetition limit would refuse its
        # challenger; this test is about what the champion holds, not whether it deserves to be one
        limits = RegistrySection(dpo_model=registered, sft_model=f"{registered}-sft", max_repetition_rate=1.0)
        decision = promote.fn(limits, "stack", {"sft": sft_model, "dpo": dpo_model},
                              dataset_ref(smoke_data["eval"], tmp_path / "eval.jsonl"),
                              smoke_config.eval, evaluation(sft_answers, dpo_answers, len(smoke_data["eval"])),
                              run_ctx)
        assert decision["decision"] == "first champion", decision.get("reasons")
        champion = mlflow.pyfunc.load_model(f"models:/{registered}@champion")
        texts = [p[0]["content"] for p in prompts]
        assert champion.predict(texts) == sft_answers, name
        loaded = champion.unwrap_python_model()
        torch.testing.assert_close(next_token_logits(loaded.model, loaded.tokenizer, prompts), sft_logits,
                                   atol=1e-4, rtol=1e-4)

    if sft_lora:  # the stacked case: LoRA DPO on a LoRA SFT, now with a learning rate that moves it
        dpo_cfg = smoke_config.dpo.model_copy(update={
            "lora": lora, "trainer": {**smoke_config.dpo.trainer, "learning_rate": LEARNING_LORA_DPO, "max_steps": 2}})
        dpo_model = dpo.fn(dpo_cfg, sft_model, pairs, run_ctx, name="dpo-lora-trained")
        moved = changed(sft_weights, weights(dpo_model.local_path))
        # the adapter's update, merged into the SFT weights: only the adapted projections moved
        assert moved and all(name.endswith("_proj.weight") for name in moved), moved
        # and it answers differently: its first answer token's logits moved well beyond the zero-rate tolerance
        assert (logits_of(dpo_model.local_path, prompts) - sft_logits).abs().max() > MOVED_LOGIT

