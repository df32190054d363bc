"""An LLM judge as a ranker (`rank.ranker: judge`): pairwise preference from a judge prompt, by a local
causal LM or any OpenAI-compatible endpoint (vLLM, SGLang, TGI, llama.cpp's server, `transformers serve`).

    rank:
      ranker: {type: judge, model: embedded:smollm2-135m}                       # local, in this process
      ranker: {type: judge, url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-7B-Instruct,
               api_key_env: JUDGE_API_KEY}                                        # a served model

The prompt is MT-Bench's pairwise judge prompt (Zheng et al. 2023) with its `[[A]]` / `[[B]]` / `[[C]]`
verdicts. Position bias is handled as MT-Bench does: each pair is judged in both orders, and two
verdicts that disagree make a tie; the share of pairs whose two orders agree is the judge's
consistency rate, logged with the rank stage (`judge.consistency_rate`), with how often the first
position won (`judge.first_position_rate`: 0.5 is unbiased) and verdicts that could not be read.

A prompt's candidates are ranked by pairwise wins (a tie counts half) over every pair of distinct
candidates, or over `max_pairs` pairs drawn at random (seeded) when that caps the judge calls.

The local judge reads its verdict from the model's own probabilities: the log-likelihood of each
verdict string after the prompt, highest wins (no generated text to parse; works for small models
that would not follow the output format). A served judge answers in text, read with MT-Bench's rule
(the last `[[A]]`, `[[B]]` or `[[C]]` in it); a reply with none counts as a tie and is counted.

TRL removed its judges after v1.0, so this interface is alignflow's own; the HTTP client is the
`openai` package (its retries with backoff and timeouts), the API key comes from an environment
variable or a Prefect Secret block and is never logged.
"""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from alignflow.components import RANKERS, Ranker, Scorer
from alignflow.engines.endpoint import openai_client
from alignflow.rankers.tournament import candidate_pairs, win_rates

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. {explain}Avoid any position "
    "biases and ensure that the order in which the responses were presented does not influence your decision. Do "
    "not allow the length of the responses to influence your evaluation. Do not favor certain names of the "
    "assistants. Be as objective as possible. {verdict}")


EXPLAIN = "Begin your evaluation by comparing the two responses and provide a short explanation. "


VERDICT = {True: 'After providing your explanation, output your final verdict by strictly following this format: '
                 '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.',
           False: 'Output only your final verdict, strictly in this format: "[[A]]" if assistant A is better, '
                  '"[[B]]" if assistant B is better, and "[[C]]" for a tie.'}


USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]"
        "\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")


VERDICT_RE = re.compile(r"\[\[([ABC])\]\]")


def judge_messages(prompt: list[dict], a: str, b: str, explain: bool) -> list[dict]:
    """The judge's chat: MT-Bench's pairwise system prompt, then the question and the two answers."""
    question = "\n\n".join(m["content"] for m in prompt if m["role"] != "assistant")
    return [{"role": "system", "content": SYSTEM.format(explain=EXPLAIN if explain else "", verdict=VERDICT[explain])},
            {"role": "user", "content": USER.format(question=question, a=a, b=b)}]


def parse_verdict(text: str) -> str | None:
    """MT-Bench's rule: the last [[A]] / [[B]] / [[C]] in the reply; None when there is none."""
    found = VERDICT_RE.findall(text or "")
    return found[-1] if found else None


def both_orders(first: str | None, second: str | None) -> float:
    """1.0 when x is preferred in both orders (verdict A with x shown first, then B with x shown second),
    0.0 when y is, 0.5 otherwise: a tie, or two orders that disagree (position bias)."""
    if first == "A" and second == "B":
        return 1.0
    if first == "B" and second == "A":
        return 0.0
    return 0.5


@RANKERS.register("judge")
class Judge(Ranker):
    """An LLM judge: `model` alone is a local model (a local directory, a `.gguf` file, a packaged
    `embedded:` GGUF model, or a hub id); with `url` it is the model name at that OpenAI-compatible
    endpoint."""

    type: str = "judge"
    pointwise: ClassVar[bool] = False
    model: str
    url: str | None = None  # an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    revision: str | None = None  # for a local judge given as a hub id
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the endpoint's key (if any)
    api_key_block: str | None = None  # or a Prefect Secret block holding it
    explain: bool = False  # ask for MT-Bench's explanation before the verdict (served judges; needs max_tokens)
    max_tokens: int = Field(default=16, gt=0)  # a served judge's reply length
    max_pairs: int | None = Field(default=None, gt=0)  # candidate pairs judged per prompt (None: all)
    concurrency: int = Field(default=8, gt=0)  # requests in flight to a served judge
    timeout: float = Field(default=120.0, gt=0)  # seconds per request
    max_retries: int = Field(default=3, ge=0)  # per request, with the openai client's backoff
    batch_size: int = Field(default=8, gt=0)  # judge prompts per forward pass, local judge
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _usable(self) -> Judge:
        from alignflow.models import gguf

        if self.explain and self.url is None:
            raise ValueError("explain: the local judge reads its verdict from probabilities, not text")
        if self.explain and self.max_tokens < 128:
            raise ValueError(f"explain: the explanation comes before the verdict: max_tokens {self.max_tokens} "
                             "leaves it no room (e.g. max_tokens: 512)")
        if self.url is None and self.model.startswith("embedded:") and gguf.packaged_source(self.model) is None:
            raise ValueError(f"model {self.model!r}: a local judge is a model directory, a .gguf file, a hub id or "
                             f"a packaged model ({', '.join('embedded:' + p for p in gguf.PACKAGED)})")
        return self

    def cache_pins(self) -> dict:
        from alignflow.pins import Uncacheable, model_source

        if self.url is not None:
            raise Uncacheable(f"the judge served at {self.url} cannot be pinned by content")
        return {"judge_model": model_source(self.model, self.revision)}

    def open(self, device: str, fetch=None) -> PairwiseJudge:
        if self.url is not None:
            return PairwiseJudge(self, HttpVerdicts(self))
        return PairwiseJudge(self, LocalVerdicts(self.local_path(fetch), device, self.batch_size,
                                                 self.trust_remote_code))

    def local_path(self, fetch=None) -> str:
        from alignflow import embedded
        from alignflow.models import gguf

        if gguf.is_gguf(self.model) or gguf.packaged_source(self.model) is not None:
            return embedded.resolve(None, self.model, "model")  # converted once to safetensors
        if Path(self.model).exists():
            return self.model
        return fetch(self.model, self.revision) if fetch else self.model


class PairwiseJudge(Scorer):
    """Ranks candidates by pairwise wins, each pair judged in both orders; counts what it saw."""

    pointwise = False

    def __init__(self, cfg: Judge, verdicts):
        self.cfg, self.verdicts = cfg, verdicts
        self.counts = {"pairs": 0, "consistent": 0, "first_wins": 0, "decisive": 0, "unparsed": 0, "calls": 0}

    def _judge(self, items: list[tuple[list[dict], str, str]]) -> list[float]:
        """Each (prompt, x, y): P(x better) in {1, 0.5, 0}, from both orders."""
        chats = [judge_messages(p, x, y, self.cfg.explain) for p, x, y in items] + \
                [judge_messages(p, y, x, self.cfg.explain) for p, x, y in items]
        said = self.verdicts(chats)
        first, second = said[:len(items)], said[len(items):]
        c = self.counts
        c["pairs"] += len(items)
        c["calls"] += len(said)
        c["unparsed"] += sum(v is None for v in said)
        for v1, v2 in zip(first, second):
            c["consistent"] += both_orders(v1, v2) != 0.5 or (v1 == v2 == "C")
            for v in (v1, v2):
                c["decisive"] += v in ("A", "B")
                c["first_wins"] += v == "A"
        return [both_orders(v1, v2) for v1, v2 in zip(first, second)]

    def score_groups(self, prompts, candidates, references):
        rng = random.Random(0)
        items, where = [], []
        for k, (prompt, cands) in enumerate(zip(prompts, candidates)):
            for i, j in candidate_pairs(cands, self.cfg.max_pairs, rng):
                items.append((prompt, cands[i], cands[j]))
                where.append((k, i, j))
        return win_rates(candidates, where, self._judge(items))

    def compare(self, prompts, first, second, references):
        items = [(p, a, b) for p, a, b in zip(prompts, first, second)]
        judged = [i for i, (_, a, b) in enumerate(items) if a != b]
        outcomes = dict(zip(judged, self._judge([items[i] for i in judged])))
        return [outcomes.get(i, 0.5) for i in range(len(items))]

    def stats(self) -> dict[str, float]:
        c = self.counts
        if not c["pairs"]:
            return {}
        return {"judge.pairs_judged": c["pairs"], "judge.calls": c["calls"],
                "judge.consistency_rate": c["consistent"] / c["pairs"],
                "judge.first_position_rate": c["first_wins"] / c["decisive"] if c["decisive"] else 0.5,
                "judge.unparsed_rate": c["unparsed"] / c["calls"]}

    def close(self) -> None:
        self.verdicts.close()


class LocalVerdicts:
    """Verdicts from a causal LM in this process: after the judge chat (its chat template, generation
    prompt added) the verdict string with the highest log-likelihood, of `[[A]]`, `[[B]]`, `[[C]]`."""

    OPTIONS = ("A", "B", "C")

    def __init__(self, path: str, device: str, batch_size: int, trust_remote_code: bool):
        from alignflow.models.loading import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = load_causal_lm(path, device, trust_remote_code=trust_remote_code).eval()
        self.device, self.batch_size = device, batch_size

    def __call__(self, chats: list[list[dict]]) -> list[str]:
        import torch
        from tqdm.auto import tqdm

        tok = self.tokenizer
        options = [tok(f"[[{o}]]", add_special_tokens=False)["input_ids"] for o in self.OPTIONS]
        verdicts = []
        for start in tqdm(range(0, len(chats), self.batch_size), desc="judge", unit="batch"):
            batch = chats[start:start + self.batch_size]
            prefixes = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                        for c in batch]
            seqs = [list(p) + o for p in prefixes for o in options]
            width, keep = max(map(len, seqs)), max(map(len, options)) + 1
            pad = tok.pad_token_id  # left padding: every option ends at the last position
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.model.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep,
                                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
            logprobs = logits.log_softmax(-1)  # [rows, keep, vocab]: position t predicts token t + 1
            for b in range(len(prefixes)):  # an option's tokens end the row; each is predicted one position earlier
                totals = [sum(logprobs[b * len(options) + k, keep - 1 - len(option) + t, token].item()
                              for t, token in enumerate(option)) for k, option in enumerate(options)]
                verdicts.append(self.OPTIONS[max(range(len(options)), key=totals.__getitem__)])
        return verdicts

    def close(self) -> None:
        self.model = None


class HttpVerdicts:
    """Verdicts from an OpenAI-compatible chat completions endpoint (temperature 0), read with MT-Bench's
    rule. Requests go `concurrency` at a time; the openai client retries each with backoff, then fails."""

    def __init__(self, cfg: Judge):
        self.cfg = cfg
        self.client = openai_client(cfg)

    def _one(self, chat: list[dict]) -> str | None:
        reply = self.client.chat.completions.create(model=self.cfg.model, messages=chat, temperature=0.0,
                                                    max_tokens=self.cfg.max_tokens)
        return parse_verdict(reply.choices[0].message.content)

    def __call__(self, chats: list[list[dict]]) -> list[str | None]:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(tqdm(pool.map(self._one, chats), total=len(chats), desc="judge", unit="call"))

    def close(self) -> None:
        self.client.close()
