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

from alignflow.components import ENGINES, Engine


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


@ENGINES.register("transformers")
class TransformersEngine(Engine):
    """The model loaded in this process (safetensors, merged adapters) and transformers' generate,
    batched across prompts, with one prefill of each prompt shared by its n samples."""

    type: str = "transformers"

    def open(self, model_path: str, device: str, tokenizer=None, trust_remote_code: bool = False
             ) -> TransformersGenerator:
        from alignflow.modeling import load_causal_lm, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model_path, trust_remote_code)
        return TransformersGenerator(load_causal_lm(model_path, device, trust_remote_code=trust_remote_code),
                                     tokenizer)


class TransformersGenerator:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts, *, n=1, sampling=None, max_new_tokens=32, batch_size=64, seed=0, progress=None):
        from alignflow.modeling import generate

        sampled = {} if sampling is None else dict(do_sample=True, temperature=sampling.temperature,
                                                   top_p=sampling.top_p)
        return generate(self.model, self.tokenizer, prompts, num_return_sequences=n, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, seed=seed, progress=progress, **sampled)

    def close(self) -> None:
        self.model = None


def answer(cfg, ref, prompts: list, device: str, label: str, seed: int = 0, pass_k: int = 0,
           path: str | None = None, stage: str = "evaluate") -> tuple[str, list[dict], list[list[dict]] | None]:
    """(template fingerprint, greedy answers, pass@k samples or None) of one model (a ModelRef; `path`: a
    local copy of it found elsewhere) with an eval section's engine and settings (evaluate, promote);
    its chat template is checked before the weights load (an error names `stage` and `label`)."""
    from alignflow.modeling import check_template, load_tokenizer

    path = path or ref.resolve()
    tokenizer = load_tokenizer(path, ref.trust_remote_code)
    template = check_template(tokenizer, ref.chat_template, f"{stage} {label}", f"model {label}")
    generator = cfg.engine.open(path, device, tokenizer, ref.trust_remote_code)
    greedy = [a[0] for a in generator.generate(prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                               progress=f"eval {label}")]
    sampled = None
    if pass_k:
        sampled = generator.generate(prompts, n=pass_k, sampling=Sampling(temperature=cfg.pass_temperature),
                                     max_new_tokens=cfg.max_new_tokens, batch_size=max(1, cfg.batch_size // pass_k),
                                     seed=seed, progress=f"pass@{pass_k} {label}")
    generator.close()
    return template, greedy, sampled
