"""Tiny base models built locally: a byte-level BPE tokenizer and small Llamas pre-trained on plain text.

    python -m alignflow.embedded build        # what `alignflow run configs/default.yaml` does when missing

A real base model in miniature: it has read prose about the suite's words and numbers, never a
chat turn, so asked an instruction it continues text instead of answering.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments,
                          set_seed)

# ChatML with generation markers: TRL can mask the loss to assistant turns, and the turn ends with
# <|im_end|>, the tokenizer's EOS, so a fine-tuned model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Spaces are tokens of their own, so a word is the same tokens wherever it stands (after a
    # space in the question, first in the answer): copying a word is copying its tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base_model(out_dir: Path, tokenizer: PreTrainedTokenizerFast, texts: list[str], *, hidden_size: int,
                     num_layers: int, num_heads: int, steps: int, seed: int, seq_len: int = 128) -> Path:
    """Pre-train a small Llama on plain text (documents joined by <|endoftext|>) and save it."""
    set_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    ids = tokenizer("<|endoftext|>".join(texts))["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    dataset = [{"input_ids": block, "labels": block} for block in blocks]
    batch_size = 16
    args = TrainingArguments(output_dir=str(out_dir / "_trainer"), per_device_train_batch_size=batch_size,
                             num_train_epochs=math.ceil(steps * batch_size / len(dataset)), max_steps=steps,
                             learning_rate=3e-3, warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine",
                             weight_decay=0.01, logging_steps=max(1, steps // 10), save_strategy="no",
                             report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed,
                             disable_tqdm=False)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
