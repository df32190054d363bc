"""The verifier and the checker: rankers that score an answer against the expected one (1.0 when right,
partial credit by overlap otherwise): the reference answer (`rank.ranker: verifier`), or the answer the
checker works out from the prompt alone (`rank.ranker: checker`).

A ranker's config names it (`rank.ranker: verifier`, or `{type: reward_model, model: ...}`); its
`open(device)` gives a scorer with `score(prompts, responses, references) -> list[float]`. A new
ranker is one module like this one in alignflow/rankers/ (docs/extending.md, "Adding a ranker, a stage
or an engine").
"""

from __future__ import annotations

import difflib
from typing import ClassVar

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
        if any(isinstance(ref, list) for ref in references):
            raise ValueError("the prompts carry verifiable constraints, not reference answers: rank them with the "
                             "constraints ranker (rank.ranker: constraints)")
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
