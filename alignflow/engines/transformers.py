"""The transformers engine (`engine: transformers`, the default): the model answers in this process
(alignflow.models.generate).
"""

from __future__ import annotations

from alignflow.components import ENGINES, Engine


@ENGINES.register("transformers")
class TransformersEngine(Engine):
    """The model loaded in this process (safetensors, merged adapters) and transformers' generate,
    batched across prompts, with one prefill of each prompt shared by its n samples."""

    type: str = "transformers"

    def open(self, model_path: str, device: str, tokenizer=None, trust_remote_code: bool = False
             ) -> TransformersGenerator:
        from alignflow.models.loading import load_causal_lm, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model_path, trust_remote_code)
        return TransformersGenerator(load_causal_lm(model_path, device, trust_remote_code=trust_remote_code),
                                     tokenizer)


class TransformersGenerator:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts, *, n=1, sampling=None, max_new_tokens=32, batch_size=64, seed=0, progress=None):
        from alignflow.models.generate import generate

        sampled = {} if sampling is None else dict(do_sample=True, temperature=sampling.temperature,
                                                   top_p=sampling.top_p)
        return generate(self.model, self.tokenizer, prompts, num_return_sequences=n, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, seed=seed, progress=progress, **sampled)

    def close(self) -> None:
        self.model = None
