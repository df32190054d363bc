"""Loading models the same way in every stage, per-device trainer defaults, and batched generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CPU_TRAINER_DEFAULTS = {
    # TRL's bf16 and gradient checkpointing defaults fail or crawl on CPU (measured: 8.9k vs 13.8k tok/s).
    "bf16": False,
    "fp16": False,
    "gradient_checkpointing": False,
    "use_cpu": True,
    "dataloader_pin_memory": False,
}


# For base tokenizers that ship no chat template (many hub base models): plain-text turns, the
# assistant's ending in the tokenizer's own EOS so the tuned model learns to stop, with generation
# markers for TRL's assistant masks. The prompt with the generation prompt is a prefix of the chat.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] + ':\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### assistant:\n' }}{%- endif %}"
)


def pick_device(setting: str = "auto") -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        from alignflow.config import ConfigError

        raise ConfigError("device: the config asks for 'cuda' but torch sees no CUDA device")
    return setting if setting != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def attn_implementation(setting: str, device: str) -> str:
    """`auto`: FlashAttention 2 on CUDA when the `flash_attn` package is installed (it makes padding-free
    batches exact), else PyTorch's SDPA, which picks its own flash/memory-efficient kernel on CUDA."""
    import importlib.util

    if setting != "auto":
        return setting
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def cuda_trainer_defaults(trl_config: str, user: dict[str, Any], attn: str, bf16: bool | None = None
                          ) -> dict[str, Any]:
    """What a user of a CUDA card expects unless the config says otherwise: bf16 where the card has it,
    Liger's fused kernels for SFT when installed (`pip install alignflow[gpu]`), no torch.compile (minutes of
    compilation for short runs), and for SFT padding-free batches when a FlashAttention kernel can keep
    the flattened sequences apart. TRL enforces `max_length` only on padded batches, so a config that
    sets it keeps padding (TRL 1.16's DPOTrainer has padding-free disabled)."""
    import importlib.util

    if bf16 is None:  # `bf16` given: what a card with or without bf16 would get (bench/device_check.py)
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    defaults: dict[str, Any] = {"bf16": bf16, "fp16": not bf16, "torch_compile": False}
    if trl_config == "SFTConfig":  # TRL 1.16 deprecates Liger in its DPOTrainer (for Hub kernels)
        defaults["use_liger_kernel"] = importlib.util.find_spec("liger_kernel") is not None
    if trl_config == "SFTConfig" and attn.startswith("flash_attention") and "max_length" not in user \
            and not user.get("packing"):
        defaults |= {"padding_free": True, "max_length": None}
    return defaults


def trainer_args(user: dict[str, Any], device: str, seed: int, output_dir: Path, checkpoint_steps: int = 0,
                 trl_config: str = "SFTConfig", attn: str = "sdpa", mixed_precision: str | None = None
                 ) -> dict[str, Any]:
    """TRL config kwargs: alignflow's per-device defaults, then the user's `trainer:` keys on top.
    `checkpoint_steps` > 0 saves a resumable checkpoint every that many optimizer steps (the last two kept);
    `mixed_precision` (a launch's: no | fp16 | bf16) sets bf16/fp16 unless `trainer:` does."""
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": seed,
        "report_to": "none",  # alignflow logs TRL's metrics itself, batched, into the stage's run
        "save_strategy": "steps" if checkpoint_steps else "no",
        "logging_steps": 5,
        "disable_tqdm": False,
    }
    if checkpoint_steps:
        defaults |= {"save_steps": checkpoint_steps, "save_total_limit": 2}
    if device == "cpu":
        defaults |= CPU_TRAINER_DEFAULTS
    else:
        defaults |= cuda_trainer_defaults(trl_config, user, attn)
    if mixed_precision:
        defaults |= {"bf16": mixed_precision == "bf16", "fp16": mixed_precision == "fp16"}
    return defaults | user


def build_trl_config(section: str, trl_config: str, args: dict[str, Any]):
    """TRL's config dataclass from resolved trainer arguments, as a stage builds it; a bad value raises
    ValueError naming the section (TRL's message names the field)."""
    import trl

    try:
        return getattr(trl, trl_config)(**args)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{section}.trainer: {err}") from None


def model_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # saved with the tuned model's tokenizer
    return tokenizer


class ChatTemplateMismatch(ValueError):
    """Two stages would render the same conversation differently; the message names both fingerprints."""


def template_fingerprint(tokenizer) -> str:
    """A short content hash of how a tokenizer renders chats: its chat template and the EOS/BOS tokens
    the template may refer to. Recorded with every model and sampled dataset (`alignflow.chat_template`)."""
    import hashlib
    import json

    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    payload = json.dumps([text, tokenizer.eos_token, tokenizer.bos_token])
    return "tmpl:" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def check_template(tokenizer, expected: str | None, where: str, source: str) -> str:
    """The tokenizer's template fingerprint; fails if it differs from the one `source` was made with.
    Called right after the tokenizer loads, before any weights do."""
    actual = template_fingerprint(tokenizer)
    if expected and actual != expected:
        raise ChatTemplateMismatch(
            f"{where}: chat template {actual} differs from {expected}, the one {source} used: the model would "
            "see conversations rendered differently from those it was trained or sampled on")
    return actual


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save/pickle files: loading one may run code


class UnsafeWeights(OSError):
    """A model directory whose weights exist only as pickle files (an OSError: the model cannot be
    loaded as it is, like a missing one)."""


def pickle_only(path: str | Path) -> list[str]:
    """The pickle weight files of a local model directory that has no safetensors weights; [] otherwise
    (safetensors present, a hub id, or no weights at all: transformers says what is missing)."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin")


def refuse_pickle(path: str | Path) -> None:
    if files := pickle_only(path):
        raise UnsafeWeights(f"{path}: only pickle weights ({', '.join(files)}): alignflow loads safetensors "
                            "only, since unpickling can run code; for a base model you trust, set "
                            "base.allow_pickle_weights: true to convert it once to safetensors")


def unpickle_to_safetensors(path: str | Path, home: Path, trust_remote_code: bool = False) -> Path:
    """A pickle-only model directory converted once to safetensors (base.allow_pickle_weights): the weights
    are read by transformers with torch.load(weights_only=True), which restores tensors, not objects."""
    import shutil

    from transformers import AutoModelForCausalLM

    from alignflow.files import build_atomically
    from alignflow.refs import digest_path

    source = Path(path)
    target = home / "unpickled" / f"{source.name}-{digest_path(source).split(':')[-1][:12]}"

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=False, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
        model.save_pretrained(tmp, safe_serialization=True)
        for item in source.iterdir():  # tokenizer, chat template, generation config, code: all but weights
            if item.is_file() and item.suffix not in PICKLE_SUFFIXES and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)

    return build_atomically(target, build)


def load_causal_lm(path: str, device: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   merge_adapter: bool = True, attn: str | None = None):
    """Full weights or a PEFT adapter dir (merged into its base); safetensors only: a directory with only
    pickle weights is refused (UnsafeWeights) before anything is unpickled."""
    refuse_pickle(path)
    kwargs = dict(dtype=model_dtype(device), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn:
        kwargs["attn_implementation"] = attn
    if is_adapter(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        if merge_adapter:
            # peft froze the base weights under the adapter; merged, they are a plain model again, which
            # full fine-tuning on top of a LoRA SFT must be able to train
            model = model.merge_and_unload().requires_grad_(True)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    return model.to(device)


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


def lora_config(section, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.target_modules, task_type=task_type)
