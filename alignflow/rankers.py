"""Rankers score candidate responses; `build_pairs` turns scores into TRL preference pairs.

A ranker is anything with `score(prompts, responses, references) -> list[float]`: the verifier
(programmatic reward from the expected answer) and a reward model (any sequence classifier) ship
here; a human-ranking or LLM-judge ranker fits the same protocol.
"""

from __future__ import annotations

import difflib
from typing import Protocol

import torch


class Ranker(Protocol):
    def score(self, prompts: list[list[dict]], responses: list[str], references: list[str | None]) -> list[float]: ...


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_correct(response: str, reference: str | None) -> bool:
    return reference is not None and normalize(response) == normalize(reference)


class Verifier:
    """1.0 for the expected answer; otherwise up to 0.5 by character overlap with it.

    The partial credit orders wrong answers (a near miss beats a ramble), which gives DPO pairs
    with a margin even when no candidate is right.
    """

    def score(self, prompts, responses, references):
        if any(ref is None for ref in references):
            raise ValueError("the verifier needs a reference answer for every prompt")
        return [1.0 if is_correct(resp, ref)
                else 0.5 * difflib.SequenceMatcher(None, normalize(resp), normalize(ref)).ratio()
                for resp, ref in zip(responses, references)]


class RewardModel:
    """Any AutoModelForSequenceClassification: the first logit of (prompt + response) is the reward."""

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


def build_pairs(rows: list[dict], rewards: list[list[float]], min_margin: float = 0.0,
                strategy: str = "best_worst", seed: int = 0) -> tuple[list[dict], int]:
    """One preference pair per prompt, in TRL's conversational preference format.

    `best_worst`: the highest- against the lowest-scored candidate (the widest margin).
    `best_random`: the highest against a random lower-scored one (more varied rejections, as in
    Online-RLHF's ablations). A prompt whose pair differs by no more than `min_margin` is a tie and is
    dropped (DPO learns nothing from two equally good answers). Returns (pairs, ties).
    """
    import random

    rng = random.Random(seed)
    pairs, ties = [], 0
    for row, scores in zip(rows, rewards):
        best = max(range(len(scores)), key=scores.__getitem__)
        if strategy == "best_random":
            lower = [i for i in range(len(scores)) if scores[best] - scores[i] > min_margin]
            worst = rng.choice(lower) if lower else best
        else:
            worst = min(range(len(scores)), key=scores.__getitem__)
        margin = scores[best] - scores[worst]
        if margin <= min_margin:
            ties += 1
            continue
        pairs.append({
            "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": row["candidates"][best]}],
            "rejected": [{"role": "assistant", "content": row["candidates"][worst]}],
            "margin": margin, "chosen_reward": scores[best], "rejected_reward": scores[worst],
            "task": row["task"],
        })
    return pairs, ties


def make_ranker(cfg, device: str) -> Ranker:
    """The ranker a `rank:` config section names."""
    if cfg.ranker == "reward_model":
        return RewardModel(cfg.reward_model, device, cfg.batch_size)
    return Verifier()
