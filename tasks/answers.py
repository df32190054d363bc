"""Every evaluated model answers the eval prompts the same way (the evaluate and promote stages): greedy
answers through the configured engine, and pass@k samples when asked.
"""

from __future__ import annotations

from alignflow.engines.base import Sampling


def answer(cfg, ref, prompts: list, device: str, label: str, seed: int = 0, pass_k: int = 0,
           path: str | None = None, stage: str = "evaluate") -> tuple[str, list[dict], list[list[dict]] | None]:
    """(template fingerprint, greedy answers, pass@k samples or None) of one model (a ModelRef; `path`: a
    local copy of it found elsewhere) with an eval section's engine and settings (evaluate, promote);
    its chat template is checked before the weights load (an error names `stage` and `label`)."""
    from alignflow.models.loading import load_tokenizer
    from alignflow.models.templates import check_template

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
