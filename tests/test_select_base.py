"""Base selection compares candidates with different tokenizers fairly.

The same model behind a finer tokenizer (each token split into k pieces, the model's probability of
every text unchanged) must score the same: bits per byte does, a mean per-token loss does not (it
falls k-fold and would flip the choice).
"""

import pytest
import torch

from alignflow import embedded
from alignflow.config import load_config
from alignflow.models.loading import load_causal_lm, load_tokenizer
from tasks.select_base import answer_bits_per_byte
from tests.conftest import SMOKE


class FinerTokenizer:
    """Tokenizes like `base`, then splits every token v into k tokens k*v, k*v+1, ..., k*v+k-1."""

    def __init__(self, base, k: int):
        self.base, self.k, self.pad_token_id = base, k, 0

    def apply_chat_template(self, *args, **kwargs):
        return self.base.apply_chat_template(*args, **kwargs)

    def __call__(self, text: str, add_special_tokens: bool = False):
        ids = self.base(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [self.k * v + j for v in ids for j in range(self.k)]}


class FinerModel(torch.nn.Module):
    """`base` over the finer tokens: after the last piece of a token, the next token's first piece has
    the base model's probability for that token; every other piece follows with probability 1."""

    def __init__(self, base, k: int):
        super().__init__()
        self.base, self.k = base, k

    @property
    def device(self):
        return self.base.device

    def forward(self, input_ids, attention_mask):
        k = self.k
        coarse = self.base(input_ids=input_ids[:, ::k] // k, attention_mask=attention_mask[:, ::k]).logits
        logp = torch.log_softmax(coarse.float(), dim=-1)  # (batch, coarse positions, vocab)
        batch, length = input_ids.shape
        vocab = logp.shape[-1]
        logits = torch.full((batch, length, k * vocab), -1e4)
        for t in range(length):
            i, j = divmod(t, k)
            if j < k - 1:  # inside a token: its next piece is certain
                logits[torch.arange(batch), t, input_ids[:, t] + 1] = 0.0
            else:  # the token is complete: the base model predicts the next one
                logits[:, t, 0::k] = logp[:, i]
        return type("Output", (), {"logits": logits})()


@pytest.fixture(scope="module")
def candidates(alignflow_home):
    spec = load_config(SMOKE).embedded
    return {name: (load_causal_lm(path, "cpu"), load_tokenizer(path))
            for name in ("tiny-xs", "tiny-s") for path in [embedded.model_path(spec, f"embedded:{name}")]}


def per_token_loss(model, tokenizer, rows) -> float:
    """The old measure: mean loss per answer token (what a tokenizer's granularity distorts)."""
    tokens = sum(len(tokenizer(r["completion"][0]["content"])["input_ids"]) for r in rows)
    n_bytes = sum(len(r["completion"][0]["content"].encode()) for r in rows)
    return answer_bits_per_byte(model, tokenizer, rows) * n_bytes * torch.log(torch.tensor(2.0)).item() / tokens


def test_the_choice_does_not_depend_on_how_finely_a_candidate_tokenizes(candidates, smoke_data):
    rows = smoke_data["sft"][:12]
    bpb = {name: answer_bits_per_byte(model, tok, rows) for name, (model, tok) in candidates.items()}
    better, worse = sorted(bpb, key=bpb.get)
    assert bpb[better] < bpb[worse]

    k = 8
    model, tokenizer = candidates[worse]
    finer_model, finer_tokenizer = FinerModel(model, k), FinerTokenizer(tokenizer, k)
    finer_bpb = answer_bits_per_byte(finer_model, finer_tokenizer, rows)
    assert finer_bpb == pytest.approx(bpb[worse], rel=1e-4)  # same model, same bits per byte
    assert min([(bpb[better], better), (finer_bpb, worse)])[1] == better  # the choice holds

    # per token, the same model re-tokenized k times finer looks k times better and would win
    coarse_loss = per_token_loss(model, tokenizer, rows)
    finer_loss = per_token_loss(finer_model, finer_tokenizer, rows)
    assert finer_loss == pytest.approx(coarse_loss / k, rel=1e-3)
    assert finer_loss < per_token_loss(*candidates[better], rows)
