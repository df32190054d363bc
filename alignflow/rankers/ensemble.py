"""Several rankers as one (`{type: ensemble, rankers: [...]}`): majority vote over candidate pairs or the
mean of within-prompt ranks, with how often the members disagree.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator

from alignflow.components import RANKERS, Ranker, Scorer

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

    @property
    def needs_constraints(self) -> bool:  # type: ignore[override]
        return any(r.needs_constraints for r in self.rankers)

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
