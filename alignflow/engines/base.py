"""The generation seam: one Generator interface for every stage that makes a model answer (sample,
evaluate, promote), and the engines that ship with alignflow (alignflow.components.ENGINES).

    generator = ENGINES.validate("transformers").open(model_dir, device, tokenizer)
    answers = generator.generate(prompts, max_new_tokens=32)                     # greedy, one each
    candidates = generator.generate(prompts, n=8, sampling=Sampling(temperature=1.0), seed=0)

Each answer is {text, ended, tokens}: `ended` says the model stopped on its own (a stop token)
rather than running out of max_new_tokens. An engine that serves the model elsewhere (vLLM or any
OpenAI-compatible server, in its own environment) is one more module registering an Engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0


class Generator(Protocol):
    def generate(self, prompts: list[list[dict]], *, n: int = 1, sampling: Sampling | None = None,
                 max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0, progress: str | None = None
                 ) -> list[list[dict]]:
        """Per chat prompt, n answers: greedy when `sampling` is None (then n copies of one answer are
        pointless: ask for n=1), sampled otherwise."""

    def close(self) -> None: ...
