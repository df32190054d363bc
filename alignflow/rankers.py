"""The rankers that ship with alignflow (registered components, alignflow.components.RANKERS).

A ranker's config names it (`rank.ranker: verifier`, or `{type: reward_model, model: ...}`); its
`open(device)` gives a scorer with `score(prompts, responses, references) -> list[float]`. A new
ranker (an LLM judge, human labels) is a module like this one; see README "Adding a ranker".
"""

from __future__ import annotations

import difflib
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator

from alignflow.components import RANKERS, Ranker, Scorer
from alignflow.stats import is_correct, normalize


@RANKERS.register("verifier")
class Verifier(Ranker, Scorer):
    """1.0 for the expected answer; otherwise up to 0.5 by character overlap with it.

    The partial credit orders wrong answers (a near miss beats a ramble), which gives DPO pairs
    with a margin even when no candidate is right.
    """

    type: str = "verifier"
    needs_reference: ClassVar[bool] = True

    def open(self, device: str, fetch=None) -> Verifier:
        return self

    def score(self, prompts, responses, references):
        if any(ref is None for ref in references):
            raise ValueError("the verifier needs a reference answer for every prompt")
        return [1.0 if is_correct(resp, ref)
                else 0.5 * difflib.SequenceMatcher(None, normalize(resp), normalize(ref)).ratio()
                for resp, ref in zip(responses, references)]


@RANKERS.register("checker")
class Checker(Verifier):
    """The verifier's scores against the answer worked out from the prompt itself (the embedded suite's
    task types: alignflow.embedded.suite.solve), as math and code verifiers check a solution from the
    problem: sampling prompts need no reference answer. A prompt it cannot solve falls back to its
    reference answer; with neither, the error names the prompt."""

    type: str = "checker"
    needs_reference: ClassVar[bool] = False

    def score(self, prompts, responses, references):
        from alignflow.embedded.suite import solve

        solved = []
        for i, (prompt, ref) in enumerate(zip(prompts, references)):
            answer = solve(prompt[-1]["content"]) or ref
            if answer is None:
                raise ValueError(f"the checker cannot answer prompt {i + 1} ({prompt[-1]['content'][:60]!r}) from "
                                 "the prompt alone and it has no reference answer")
            solved.append(answer)
        return super().score(prompts, responses, solved)


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


MemberField = Annotated[SerializeAsAny[Ranker], BeforeValidator(RANKERS.validate)]


@RANKERS.register("ensemble")
class Ensemble(Ranker):
    """Several rankers at once. `vote: majority`: for every pair of a prompt's candidates each member
    votes for the one it scores higher (weighted by `weights`; a tie votes half each way) and a
    candidate's score is its share of pairs won; `vote: mean`: the weighted mean of each member's
    within-prompt rank of the candidate (0 worst, 1 best), so reward scales never mix. Pairs that
    members order differently are counted (`ensemble.disagreement_rate`, and per member its agreement
    with the ensemble's order)."""

    type: str = "ensemble"
    pointwise: ClassVar[bool] = False
    rankers: list[MemberField] = Field(min_length=2)
    weights: list[float] | None = None  # one per ranker, > 0; None: equal
    vote: Literal["majority", "mean"] = "majority"

    @model_validator(mode="after")
    def _one_weight_each(self) -> Ensemble:
        if self.weights is not None and (len(self.weights) != len(self.rankers) or min(self.weights) <= 0):
            raise ValueError(f"weights: one positive weight per ranker ({len(self.rankers)}), got {self.weights}")
        return self

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return any(r.needs_reference for r in self.rankers)

    def cache_pins(self) -> dict:
        return {"members": [r.cache_pins() for r in self.rankers]}

    def open(self, device: str, fetch=None) -> EnsembleScorer:
        return EnsembleScorer(self, [r.open(device, fetch) for r in self.rankers])


class EnsembleScorer(Scorer):
    pointwise = False

    def __init__(self, cfg: Ensemble, members: list[Scorer]):
        self.cfg, self.members = cfg, members
        self.weights = cfg.weights or [1.0] * len(members)
        self.counts = {"pairs": 0, "disagreements": 0}
        self.member_stats: dict[str, float] = {}

    def score_groups(self, prompts, candidates, references):
        from alignflow.stats import agreement, pair_preferences

        per_member = [m.score_groups(prompts, candidates, references) for m in self.members]
        combine = self._majority if self.cfg.vote == "majority" else self._mean
        scores = [combine([member[k] for member in per_member]) for k in range(len(prompts))]
        votes = [pair_preferences(member) for member in per_member]
        self.counts["pairs"] += len(votes[0])
        self.counts["disagreements"] += sum(len(set(v)) > 1 for v in zip(*votes))
        for i, (ranker, member) in enumerate(zip(self.cfg.rankers, per_member)):
            self.member_stats[f"ensemble.member{i}.{ranker.type}.agreement"] = agreement(member, scores)["agreement"]
        return scores

    def _majority(self, member_scores: list[list[float]]) -> list[float]:
        n = len(member_scores[0])
        wins = [0.0] * n
        for i in range(n):
            for j in range(i + 1, n):
                votes = sum(w * (1.0 if s[i] > s[j] else 0.0 if s[i] < s[j] else 0.5)
                            for w, s in zip(self.weights, member_scores)) / sum(self.weights)
                won = 1.0 if votes > 0.5 else 0.0 if votes < 0.5 else 0.5
                wins[i] += won
                wins[j] += 1 - won
        return [w / (n - 1) if n > 1 else 0.5 for w in wins]

    def _mean(self, member_scores: list[list[float]]) -> list[float]:
        n = len(member_scores[0])

        def ranks(scores: list[float]) -> list[float]:  # 0 = worst, 1 = best; tied candidates share a rank
            return [(sum(x < s for x in scores) + 0.5 * (sum(x == s for x in scores) - 1)) / max(n - 1, 1)
                    for s in scores]

        ranked = [ranks(s) for s in member_scores]
        return [sum(w * r[i] for w, r in zip(self.weights, ranked)) / sum(self.weights) for i in range(n)]

    def compare(self, prompts, first, second, references):
        return [s[0] if s[0] != s[1] else 0.5
                for s in self.score_groups(prompts, [[a, b] for a, b in zip(first, second)], references)]

    def stats(self) -> dict[str, float]:
        stats = {"ensemble.pairs": self.counts["pairs"],
                 "ensemble.disagreement_rate": self.counts["disagreements"] / max(self.counts["pairs"], 1)}
        for member in self.members:
            stats |= member.stats()
        return stats | self.member_stats

    def close(self) -> None:
        for member in self.members:
            member.close()
