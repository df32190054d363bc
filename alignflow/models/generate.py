"""Batched generation with transformers (the transformers engine's): stop tokens, n answers per prompt
from one shared prompt prefix, each answer with whether the model ended it.
"""

from __future__ import annotations

import torch


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS plus the chat template's end-of-turn token, so generation stops where an answer ends."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def shared_prefix(model, batch: dict, n: int) -> dict:
    """Several samples per prompt without computing the prompt n times: one forward pass over each
    prompt (all but its last token) fills the KV cache, which is then repeated n times; generate()
    continues from it. `num_return_sequences=n` would repeat the prompts first and prefill each copy.
    Hand-written because transformers' generate has no prompt sharing."""
    import inspect

    from transformers import DynamicCache

    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = DynamicCache(config=model.config)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.x
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding, as generate() computes them
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
          **{key: cache})
    cache.batch_repeat_interleave(n)
    return {"input_ids": ids.repeat_interleave(n, dim=0), "attention_mask": mask.repeat_interleave(n, dim=0),
            key: cache}


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], *, num_return_sequences: int = 1,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32,
             batch_size: int = 64, seed: int = 0, progress: str | None = None) -> list[list[dict]]:
    """Answers to chat prompts: batched across prompts, longest first, left-padded, stopping at EOS.

    Returns, per prompt, `num_return_sequences` dicts {text, ended, tokens} where `ended` says the
    model emitted a stop token (rather than running out of max_new_tokens).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.eval()
    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer, model)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[list[dict]] = [[] for _ in prompts]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None):
        idx = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(model.device)
        if num_return_sequences > 1:  # rows come back already repeated, one per candidate
            batch = shared_prefix(model, batch, num_return_sequences)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, top_k=None, **sampling)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        for row, tokens in enumerate(new_tokens):
            cut = next((k for k, t in enumerate(tokens) if t in stops), None)
            kept = tokens if cut is None else tokens[:cut]
            results[idx[row // num_return_sequences]].append(
                {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(), "ended": cut is not None,
                 "tokens": len(kept)})
    return results
