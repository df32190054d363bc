"""The constraints ranker (`rank.ranker: constraints`): scores an answer by the verifiable constraints its
prompt carries (IFEval's instruction ids, alignflow.constraints), as Tülu 3 ranks its IFEval-style
preference pairs and rewards its RLVR stage.

    rank:
      ranker: {type: constraints, credit: partial, loose: false}

`credit: partial` (the default) gives the share of the prompt's constraints met, which orders two answers
that both fail; `strict` gives 1.0 only when all are met (IFEval's prompt-level accuracy). `loose` reads
each answer as IFEval's loose accuracy does. The same scorer is a reward function for any stage that
calls one (`reward_function`, in TRL's reward-function shape).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from alignflow.components import RANKERS, Ranker, Scorer
from alignflow.constraints import followed, parse


@RANKERS.register("constraints")
class Constraints(Ranker, Scorer):
    """The share of a prompt's constraints an answer meets (`credit: strict`: all or nothing)."""

    type: str = "constraints"
    needs_constraints: ClassVar[bool] = True
    credit: Literal["partial", "strict"] = "partial"
    loose: bool = False

    def open(self, device: str, fetch=None) -> Constraints:
        return self

    def reward(self, response: str, constraints: list[dict], prompt: str = "") -> float:
        met = followed(parse(constraints), response, prompt, self.loose)
        return float(all(met)) if self.credit == "strict" else sum(met) / len(met)

    def score(self, prompts, responses, references):
        scores = []
        for i, (prompt, response, constraints) in enumerate(zip(prompts, responses, references)):
            if not isinstance(constraints, list) or not constraints:
                raise ValueError(f"the constraints ranker needs verifiable constraints for every prompt; prompt "
                                 f"{i + 1} ({prompt[-1]['content'][:60]!r}) has none")
            scores.append(self.reward(response, constraints, prompt[-1]["content"]))
        return scores

    def reward_function(self):
        """A reward function in TRL's shape (GRPOTrainer's `reward_funcs`): called with the completions and the
        dataset's columns, here `constraints`; conversational completions are read by their last message."""
        def constraints_reward(completions, constraints, **_) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [self.reward(t, spec) for t, spec in zip(texts, constraints)]

        return constraints_reward
