"""A generation engine that asks an OpenAI-compatible server (`vllm serve`, SGLang, TGI, llama.cpp's
server, `transformers serve`) for the answers instead of loading the model in this process:

    sample:
      engine: {type: openai, url: http://127.0.0.1:8000/v1, model: my-sft-model, api_key_env: VLLM_API_KEY}

The server must serve the model the stage is given (for sampling, the SFT model: point the server at
its saved directory, or load it as a LoRA adapter where the server supports that); alignflow cannot
check what a server holds, so a stage with this engine is never cached. Chat completions with `n`
answers per prompt; a server that ignores `n` (transformers serve) is asked again until each prompt
has n. `ended` is `finish_reason == "stop"`. The client is the `openai` package: its retries with
backoff and timeouts, then the stage fails naming the server. The key comes from an environment
variable or a Prefect Secret block and is never logged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

from alignflow.components import ENGINES, Engine


@ENGINES.register("openai")
class OpenAIEngine(Engine):
    type: str = "openai"
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str  # the name the server knows the model by
    api_key_env: str = "OPENAI_API_KEY"
    api_key_block: str | None = None  # or a Prefect Secret block holding the key
    concurrency: int = Field(default=8, gt=0)  # requests in flight
    timeout: float = Field(default=120.0, gt=0)  # seconds per request
    max_retries: int = Field(default=3, ge=0)  # per request, with the openai client's backoff

    def cache_pins(self) -> dict:
        from alignflow.pins import Uncacheable

        raise Uncacheable(f"the model served at {self.url} cannot be pinned by content")

    def open(self, model_path: str, device: str, tokenizer=None, trust_remote_code: bool = False) -> OpenAIGenerator:
        return OpenAIGenerator(self)


class OpenAIGenerator:
    def __init__(self, cfg: OpenAIEngine):
        from alignflow.engines.endpoint import openai_client

        self.cfg = cfg
        self.client = openai_client(cfg)

    def _answers(self, job: tuple[list[dict], int, dict, int]) -> list[dict]:
        prompt, n, sampling, seed = job
        answers: list[dict] = []
        while len(answers) < n:  # a server may return fewer choices than asked (or ignore n)
            reply = self.client.chat.completions.create(model=self.cfg.model, messages=prompt,
                                                        n=n - len(answers), seed=seed + len(answers), **sampling)
            answers += [{"text": c.message.content or "", "ended": c.finish_reason == "stop",
                         "tokens": reply.usage.completion_tokens if reply.usage and len(reply.choices) == 1 else 0}
                        for c in reply.choices[: n - len(answers)]]
        return answers

    def generate(self, prompts, *, n=1, sampling=None, max_new_tokens=32, batch_size=64, seed=0, progress=None):
        from tqdm.auto import tqdm

        params = {"max_tokens": max_new_tokens, **({"temperature": 0.0} if sampling is None else
                                                    {"temperature": sampling.temperature, "top_p": sampling.top_p})}
        jobs = [(prompt, n, params, seed + 1000 * i) for i, prompt in enumerate(prompts)]
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(tqdm(pool.map(self._answers, jobs), total=len(jobs), desc=progress or "generate",
                             unit="prompt", disable=progress is None))

    def close(self) -> None:
        self.client.close()
