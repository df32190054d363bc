"""A reward model as a ranker (`{type: reward_model, model: ...}`): any sequence-classification model
scores each answer; its weights are pinned by content in the cache key.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignflow.components import RANKERS, Ranker, Scorer


@RANKERS.register("reward_model")
class RewardModelRanker(Ranker):
    """Any AutoModelForSequenceClassification (local directory or hub id): the first logit of
    (prompt + response), rendered with the reward model's own chat template, is the reward."""

    type: str = "reward_model"
    model: str
    revision: str | None = None
    batch_size: int = Field(default=32, gt=0)
    trust_remote_code: bool = False

    def cache_pins(self) -> dict:
        from alignflow.pins import model_source

        return {"reward_model": model_source(self.model, self.revision)}  # its weights, by content

    def open(self, device: str, fetch=None) -> RewardModel:
        path = fetch(self.model, self.revision) if fetch else self.model
        return RewardModel(path, device, self.batch_size, self.trust_remote_code)


class RewardModel(Scorer):
    def __init__(self, path: str, device: str, batch_size: int = 32, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def _text(self, prompt: list[dict], response: str) -> str:
        conversation = prompt + [{"role": "assistant", "content": response}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(m["content"] for m in conversation)

    @torch.inference_mode()
    def score(self, prompts, responses, references):
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   return_tensors="pt").to(self.model.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores
